"""Review of the withdrawn studies left out of study-level searches
(pacs.query.engine.READABLE): normal studies of every shape stay shown,
withdrawn ones leave the searches the README names, and retrieves of them
still work. One real `pacs serve` per database, DCMTK storescu, findscu and
getscu, QIDO-RS, FHIR and the worklist over HTTP.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid

from .conftest import PacsServer, run_dcmtk
from .dicomfiles import make_ct
from .test_query_retrieve import findscu, study_matches
from .test_rejections import DOSE_SR, OF_INTEREST, REJECTED, WRONG_ENTRY, _note, _study, archive  # noqa: F401

PR_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _one(server: PacsServer, path: Path, patient: str, **extra: object) -> str:
    """A study of one object (*extra* its attributes), sent; its UID."""
    study = generate_uid()
    make_ct(path, StudyInstanceUID=study, SeriesInstanceUID=generate_uid(), PatientID=patient,
            PatientName="NGUYEN^VAN AN", **extra)
    assert server.storescu(str(path), calling="CT_ROOM1").returncode == 0
    return study


def test_withdrawn_studies_leave_searches_and_normal_ones_stay(archive: PacsServer, tmp_path: Path) -> None:
    server = archive
    shown: dict[str, str] = {}
    shown["ct"], _ = _study(server, tmp_path / "ct", "WD-1", [1])
    shown["no-modality"] = _one(server, tmp_path / "nomod.dcm", "WD-2", Modality=None, sop_class=SC_CLASS)
    shown["sr"] = _one(server, tmp_path / "sr.dcm", "WD-3", Modality="SR", sop_class=DOSE_SR)
    shown["pr"] = _one(server, tmp_path / "pr.dcm", "WD-4", Modality="PR", sop_class=PR_CLASS)
    # Images without a Modality and a rejection note withdrawing one of them: "KO" by the modalities.
    blank, ((blank_series, *blank_sops),) = _study(server, tmp_path / "blank", "WD-5", [2], Modality="")
    shown["blank"] = blank
    keyed, ((keyed_series, *keyed_sops),) = _study(server, tmp_path / "keyed", "WD-6", [2])
    shown["keyed"] = keyed
    gone, ((gone_series, *gone_sops),) = _study(server, tmp_path / "gone", "WD-7", [2])
    dosed, (dosed_images,) = _study(server, tmp_path / "dosed", "WD-8", [1])
    dose = make_ct(tmp_path / "dose.dcm", sop_class=DOSE_SR, StudyInstanceUID=dosed, Modality="SR",
                   SeriesInstanceUID=generate_uid(), PatientID="WD-8", PatientName="NGUYEN^VAN AN")
    notes = [_note(tmp_path / "n1.dcm", blank, "WD-5", REJECTED, {blank: [blank_series, blank_sops[0]]}),
             _note(tmp_path / "n2.dcm", keyed, "WD-6", OF_INTEREST, {keyed: [keyed_series, keyed_sops[0]]}),
             _note(tmp_path / "n3.dcm", gone, "WD-7", WRONG_ENTRY, {gone: [gone_series, *gone_sops]}),
             _note(tmp_path / "n4.dcm", dosed, "WD-8", WRONG_ENTRY, {dosed: dosed_images})]
    # A patient with a study to read and a withdrawn one.
    mixed, _ = _study(server, tmp_path / "mixed", "WD-9", [1])
    mixed_gone, (mixed_gone_images,) = _study(server, tmp_path / "mixed-gone", "WD-9", [2])
    notes.append(_note(tmp_path / "n5.dcm", mixed_gone, "WD-9", WRONG_ENTRY, {mixed_gone: mixed_gone_images}))
    assert server.storescu(str(dose), *map(str, notes), calling="CT_ROOM1").returncode == 0
    shown["mixed"] = mixed
    withdrawn = {gone, dosed, mixed_gone}
    everything = set(shown.values()) | withdrawn
    radiologist = server.make_token("wd.rad", "radiologist")
    with server.http(radiologist) as http:
        def qido(**params: str) -> list[str]:
            answer = http.get("/dicom-web/studies", params=params)
            assert answer.status_code in (200, 204), answer.text
            return [s["0020000D"]["Value"][0] for s in answer.json()] if answer.status_code == 200 else []

        for fuzzy in ("false", "true"):
            assert set(qido(PatientName="NGUYEN*", fuzzymatching=fuzzy)) & everything == set(shown.values())
        paged = [u for offset in range(0, 12, 2)
                 for u in qido(PatientName="NGUYEN*", fuzzymatching="true", limit="2", offset=str(offset))]
        assert set(paged) & everything == set(shown.values())
        for uid in everything:
            assert qido(StudyInstanceUID=uid) == [uid]
        listed = http.get("/api/worklist", params={"name": "NGUYEN", "limit": "100"}).json()
        assert {i["study_uid"] for i in listed["items"]} & everything == set(shown.values())
        assert listed["total"] == len(listed["items"]) and listed["total_exact"], listed
        bundle = http.get("/fhir/ImagingStudy", params={"patient.identifier": "WD-7,WD-8,WD-1,WD-5"}).json()
        assert bundle["total"] == 2, bundle
    patients = {"ct": "WD-1", "no-modality": "WD-2", "sr": "WD-3", "pr": "WD-4", "blank": "WD-5", "keyed": "WD-6",
                "mixed": "WD-9"}
    for model in ("-S", "-P"):  # study root, patient root
        for kind, patient in patients.items():
            found = findscu(server, tmp_path, "STUDY", {"PatientID": patient, "StudyInstanceUID": ""}, model)
            assert [str(r.StudyInstanceUID) for r in found] == [shown[kind]], (model, kind)
        for patient in ("WD-7", "WD-8"):
            assert findscu(server, tmp_path, "STUDY", {"PatientID": patient, "StudyInstanceUID": ""}, model) == []
    assert study_matches(server, tmp_path, PatientID="WD-7") == set()
    # Patient level: a patient with nothing but withdrawn studies is not listed; the
    # counts are of the studies a search shows.
    counts = {"NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedSeries": "",
              "NumberOfPatientRelatedInstances": ""}
    listed_patients = {str(r.PatientID): r for r in
                       findscu(server, tmp_path, "PATIENT", {"PatientName": "NGUYEN*", **counts}, "-P")}
    assert set(listed_patients) & {*patients.values(), "WD-7", "WD-8"} == set(patients.values())
    mixed_patient = listed_patients["WD-9"]
    assert (int(mixed_patient.NumberOfPatientRelatedStudies), int(mixed_patient.NumberOfPatientRelatedSeries),
            int(mixed_patient.NumberOfPatientRelatedInstances)) == (1, 1, 1)
    at_study = findscu(server, tmp_path, "STUDY", {"PatientID": "WD-9", "StudyInstanceUID": "", **counts})
    assert [(str(r.StudyInstanceUID), int(r.NumberOfPatientRelatedStudies)) for r in at_study] == [(mixed, 1)]
    named = findscu(server, tmp_path, "STUDY", {"StudyInstanceUID": mixed_gone, **counts})
    assert [int(r.NumberOfPatientRelatedStudies) for r in named] == [2]  # a search naming it shows it
    # Retrieves still work: by the study, and the patient's whole record at patient level.
    for level, keys in (("STUDY", {"StudyInstanceUID": gone}), ("PATIENT", {"PatientID": "WD-8"})):
        out = tmp_path / f"get-{level}"
        out.mkdir()
        args = ["-P", "-od", str(out), "-aec", server.ae_title, "-k", f"QueryRetrieveLevel={level}"]
        for k, v in keys.items():
            args += ["-k", f"{k}={v}"]
        got = run_dcmtk("getscu", *args, "127.0.0.1", str(server.dicom_port))
        assert got.returncode == 0, got.stderr
        assert len(list(out.iterdir())) == (1 if level == "STUDY" else 2), (level, got.stderr)


def test_a_withdrawn_study_does_not_make_a_study_search_read_every_series_on_postgresql(pg_url: str) -> None:
    """The test of a study's series (any other than KO, PR, SR) is made for
    the few studies of notes alone; PostgreSQL made it a hashed subplan, which
    reads the whole series table as soon as one withdrawn study is met: a
    newest-first page (QIDO-RS, C-FIND, the worklist) with withdrawn studies
    among the newest took 65-95 ms at 100,000 studies instead of 1-3 ms."""
    from sqlalchemy import func, select, text

    from bench.synthetic import LoadSpec, load
    from pacs.index import create_index_engine, upgrade_schema
    from pacs.query import Level, Query, build_select
    from pacs.query.attributes import patients, series, studies

    engine = create_index_engine(pg_url)
    try:
        upgrade_schema(engine)
        load(engine, LoadSpec(studies=20_000, instances_per_study=1))
        with engine.begin() as conn:
            newest = conn.execute(select(studies.c.pk).order_by(studies.c.study_date.desc()).limit(5)).scalars().all()
            conn.execute(studies.update().where(studies.c.pk.in_(newest)).values(modalities="KO"))
            conn.execute(series.update().where(series.c.study_pk.in_(newest)).values(modality="KO"))
            conn.exec_driver_sql("ANALYZE")
        for match in ({}, {"PatientName": "NGUYEN*"}):
            with engine.connect() as conn:
                stmt, _ = build_select(Query(Level.STUDY, match, ["StudyInstanceUID"], newest_first=True), conn)
                stmt = stmt.order_by(studies.c.study_date.desc(), studies.c.pk.desc()).limit(101)
                sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
                plan = "\n".join(conn.execute(text("EXPLAIN ANALYZE " + sql)).scalars())
                found = conn.execute(stmt).all()
            assert "Seq Scan on series" not in plan, plan
            assert not {r._pk for r in found} & set(newest)
            assert len(found) == 101
        # Patient level: each patient's studies are looked up by their index, and
        # counted without the withdrawn ones.
        with engine.connect() as conn:
            owners = dict(conn.execute(select(studies.c.patient_pk, func.count())
                                       .where(studies.c.pk.in_(newest)).group_by(studies.c.patient_pk)).all())
            totals = dict(conn.execute(select(studies.c.patient_pk, func.count())
                                       .where(studies.c.patient_pk.in_(owners)).group_by(studies.c.patient_pk)).all())
            stmt, _ = build_select(Query(Level.PATIENT, {}, ["NumberOfPatientRelatedStudies"]), conn)
            page = stmt.order_by(patients.c.pk).limit(100)
            sql = str(page.compile(conn, compile_kwargs={"literal_binds": True}))
            plan = "\n".join(conn.execute(text("EXPLAIN ANALYZE " + sql)).scalars())
            found = {r._pk: r.NumberOfPatientRelatedStudies
                     for r in conn.execute(stmt.where(patients.c.pk.in_(owners)))}
        assert "Seq Scan on series" not in plan and "Seq Scan on studies" not in plan, plan
        assert found == {pk: totals[pk] - owners[pk] for pk in owners if totals[pk] > owners[pk]}
    finally:
        engine.dispose()
