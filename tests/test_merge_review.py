"""Patient merges (ADT^A40) and identifiers against a real `pacs serve`, over
real MLLP (python-hl7) and DICOM (DCMTK storescu, getscu, findscu -W):

- a merged study is retrieved with the surviving patient's demographics,
  not only its Patient ID (C-GET and WADO-RS alike);
- an A40 with several PID/MRG pairs merges every pair, or none;
- a merged-away Patient ID stays an alias of the surviving patient (new
  studies and orders under it are filed there);
- the hospital number (PI) becomes the key of a patient first registered
  by citizen ID, and no other ID repeats the key;
- an empty MSH-9 or MSH-10 is answered AE (the message is wrong), not AR.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from .conftest import Backend, PacsServer, run_dcmtk
from .dicomfiles import make_ct
from .peers import create_database, dataset_bytes, drop_database
from .test_worklist_ris import _cfind_names, msa, send, worklist


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def his(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    pg = create_database() if request.param == "pg" else None
    server = PacsServer(tmp_path_factory.mktemp(f"merge-{request.param}") / "data",
                        Backend(request.param, pg, None, {}))
    server.start()
    yield server
    server.stop()
    if pg:
        drop_database(pg)


_count = [0]


def _msh(kind: str, control: str = "") -> str:
    _count[0] += 1
    control = control or f"MR{_count[0]}"
    return f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261205100000||{kind}|{control}|P|2.5|||||VN|UNICODE UTF-8\n"


def _adt(trigger: str, pid3: str, name: str, birth: str = "", sex: str = "", mrg: str = "") -> str:
    message = _msh(f"ADT^{trigger}") + f"EVN|{trigger}|20261205\nPID|1||{pid3}||{name}||{birth}|{sex}\n"
    return message + (f"MRG|{mrg}\n" if mrg else "")


def _orm(pid3: str, accession: str, name: str = "Phạm^Văn D", study_uid: str = "") -> str:
    zds = f"ZDS|{study_uid}^100^Application^DICOM\n" if study_uid else ""
    return (_msh("ORM^O01") + f"PID|1||{pid3}||{name}||19700101|M\n"
            f"ORC|NW|P{accession}|{accession}\n"
            f"OBR|1|P{accession}|{accession}|CT01^CT ngực^L||||||||||||||{accession}|RP{accession}|||||CT\n"
            + zds)


def _aa(server: PacsServer, message: str) -> None:
    ack = send(server, message)
    assert msa(ack)[0] == "AA", ack


def _store(server: PacsServer, path: Path) -> str:
    result = server.storescu(str(path))
    assert result.returncode == 0, result.stderr
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


_PATIENT_TAGS = {"PatientName": "00100010", "PatientID": "00100020", "IssuerOfPatientID": "00100021",
                 "PatientBirthDate": "00100030", "PatientSex": "00100040"}


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    value = values[0]
    return value.get("Alphabetic", "") if isinstance(value, dict) else str(value)


def _metadata(server: PacsServer, study_uid: str) -> list[dict[str, str]]:
    """The patient attributes of every instance of the study, by WADO-RS /metadata."""
    with server.http() as http:
        reply = http.get(f"/dicom-web/studies/{study_uid}/metadata")
    assert reply.status_code == 200, reply.text
    return [{k: _value(item, tag) for k, tag in _PATIENT_TAGS.items()} for item in reply.json()]


def _c_get(server: PacsServer, study_uid: str, out: Path) -> list[dict[str, str]]:
    """The patient attributes of every instance of the study, by C-GET (DCMTK getscu)."""
    out.mkdir()
    result = run_dcmtk("getscu", "-S", "-aec", server.ae_title, "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                       "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(server.dicom_port))
    assert result.returncode == 0, result.stderr
    got = [dcmread(p, stop_before_pixels=True) for p in sorted(out.iterdir())]
    assert got, result.stderr
    return [{k: str(ds.get(k, "")) for k in _PATIENT_TAGS} for ds in got]


def _qido(server: PacsServer, study_uid: str) -> list[tuple[str, str]]:
    with server.http() as http:
        reply = http.get("/dicom-web/studies", params={"StudyInstanceUID": study_uid})
    assert reply.status_code in (200, 204), reply.text
    rows = reply.json() if reply.status_code == 200 else []
    return [(_value(r, "00100010"), _value(r, "00100020")) for r in rows]


def _corrections(server: PacsServer, study_uid: str) -> dict[str, str]:
    with server.http() as http:
        reply = http.get(f"/api/studies/{study_uid}/corrections")
    assert reply.status_code == 200, reply.text
    return {c["keyword"]: c["corrected"] for c in reply.json()}


# -- 1. a merged study is retrieved with every attribute of the surviving patient -------------
def test_merged_study_is_retrieved_with_the_surviving_patient(his: PacsServer, tmp_path: Path) -> None:
    study = _store(his, make_ct(tmp_path / "old.dcm", PatientID="P500", PatientName="OLD^NAME",
                                PatientBirthDate="19500505", PatientSex="M"))
    _aa(his, _adt("A08", "P600^^^BVDK^PI", "Trần^Thị B", "19800101", "F"))
    _aa(his, _adt("A40", "P600^^^BVDK^PI", "Trần^Thị B", mrg="P500"))
    surviving = {"PatientName": "Trần^Thị B", "PatientID": "P600", "IssuerOfPatientID": "BVDK",
                 "PatientBirthDate": "19800101", "PatientSex": "F"}
    assert _qido(his, study) == [("Trần^Thị B", "P600")]
    assert _metadata(his, study) == [surviving]
    assert _c_get(his, study, tmp_path / "got") == [surviving]
    # The stored bytes are untouched: the corrections say what was received.
    assert _corrections(his, study) == {**surviving}


# -- 2. every PID/MRG pair of one A40, in one transaction ---------------------------------------
def test_a40_with_several_pairs_merges_every_pair(his: PacsServer, tmp_path: Path) -> None:
    _aa(his, _adt("A04", "M1A^^^BVDK^PI", "Một^A"))
    _aa(his, _adt("A04", "M2A^^^BVDK^PI", "Hai^A"))
    first = _store(his, make_ct(tmp_path / "m1.dcm", PatientID="M1A", PatientName="MOT^A"))
    second = _store(his, make_ct(tmp_path / "m2.dcm", PatientID="M2A", PatientName="HAI^A"))
    _aa(his, _msh("ADT^A40^ADT_A39") + "EVN|A40|20261205\nPID|1||M1B^^^BVDK^PI||Một^B\nMRG|M1A^^^BVDK\n"
        "PID|2||M2B^^^BVDK^PI||Hai^B\nMRG|M2A^^^BVDK\n")
    assert _cfind_names(his, StudyInstanceUID=first) == [("Một^B", "M1B", first)]
    assert _cfind_names(his, StudyInstanceUID=second) == [("Hai^B", "M2B", second)]
    assert _metadata(his, second)[0]["PatientName"] == "Hai^B"


def test_a40_with_a_bad_pair_merges_nothing(his: PacsServer, tmp_path: Path) -> None:
    _aa(his, _adt("A04", "M3A^^^BVDK^PI", "Ba^A"))
    study = _store(his, make_ct(tmp_path / "m3.dcm", PatientID="M3A", PatientName="BA^A"))
    ack = send(his, _msh("ADT^A40^ADT_A39") + "EVN|A40|20261205\nPID|1||M3B^^^BVDK^PI||Ba^B\nMRG|M3A^^^BVDK\n"
               "PID|2||M4B^^^BVDK^PI||Bon^B\nMRG|NOSUCH^^^BVDK\n")
    assert msa(ack)[0] == "AE", ack
    assert _cfind_names(his, StudyInstanceUID=study) == [("Ba^A", "M3A", study)]
    # A PID without its MRG is refused too, not half applied.
    ack = send(his, _msh("ADT^A40^ADT_A39") + "EVN|A40|20261205\nPID|1||M3B^^^BVDK^PI||Ba^B\nMRG|M3A^^^BVDK\n"
               "PID|2||M4B^^^BVDK^PI||Bon^B\n")
    assert msa(ack)[0] == "AE", ack
    assert _cfind_names(his, StudyInstanceUID=study) == [("Ba^A", "M3A", study)]


# -- 3. a merged-away Patient ID is an alias of the surviving patient ---------------------------
def test_a_merged_away_id_files_under_the_surviving_patient(his: PacsServer, tmp_path: Path) -> None:
    _store(his, make_ct(tmp_path / "a.dcm", PatientID="P510", PatientName="OLD^NAME"))
    _aa(his, _adt("A08", "P610^^^BVDK^PI", "Lê^Văn C", "19800101", "M"))
    _aa(his, _adt("A40", "P610^^^BVDK^PI", "Lê^Văn C", mrg="P510"))
    # A modality that still has the old ID (no issuer, as modalities send it).
    late = make_ct(tmp_path / "late.dcm", PatientID="P510", PatientName="OLD^NAME")
    sent = late.read_bytes()
    study = _store(his, late)
    assert _cfind_names(his, StudyInstanceUID=study) == [("Lê^Văn C", "P610", study)]
    # No patient P510 beside P610: a query for the old ID finds the surviving patient.
    by_old_id = _cfind_names(his, PatientID="P510")
    assert len(by_old_id) == 2 and {(name, pid) for name, pid, _ in by_old_id} == {("Lê^Văn C", "P610")}
    expected = {"PatientName": "Lê^Văn C", "PatientID": "P610", "IssuerOfPatientID": "BVDK",
                "PatientBirthDate": "19800101", "PatientSex": "M"}
    assert _metadata(his, study) == [expected]
    assert _corrections(his, study)["PatientID"] == "P610"
    # The object itself keeps its bytes.
    core = his.core()
    try:
        stored = core.reader.stored_instance(str(dcmread(late, stop_before_pixels=True).SOPInstanceUID))
        assert stored is not None
        assert dataset_bytes(core.store.read_bytes(stored.storage_key)) == dataset_bytes(sent)
    finally:
        core.close()
    # FHIR lists the merged-away ID as the surviving patient's old identifier.
    with his.http() as http:
        bundle = http.get("/fhir/Patient", params={"identifier": "P610"}).json()
    (entry,) = bundle["entry"]
    old = [i for i in entry["resource"]["identifier"] if i["value"] == "P510"]
    assert [i.get("use") for i in old] == ["old"], entry["resource"]["identifier"]
    # An order for the old ID (with its issuer) is the surviving patient's too.
    _aa(his, _orm("P510^^^BVDK^PI", "ALIAS1", name="Lê^Văn C"))
    items = _worklist(his, tmp_path, "ALIAS1", "PatientID", "PatientName")
    assert [(i.PatientID, str(i.PatientName)) for i in items] == [("P610", "Lê^Văn C")]


def _worklist(server: PacsServer, tmp_path: Path, accession: str, *keys: str) -> list[Dataset]:
    """The worklist items of *accession* (MWL matches no Accession Number: filtered here)."""
    items = worklist(server, tmp_path, "AccessionNumber", *keys)
    return [i for i in items if i.AccessionNumber == accession]


# -- 4. the hospital number becomes the key of a patient known by citizen ID ---------------------
def _other_ids(item: Dataset) -> list[tuple[str, str]]:
    return [(o.PatientID, o.get("IssuerOfPatientID", "")) for o in item.get("OtherPatientIDsSequence", [])]


def test_hospital_number_becomes_the_patient_id(his: PacsServer, tmp_path: Path) -> None:
    study_uid = "1.2.826.0.1.3680043.8.498.91001"
    _aa(his, _orm("001085099999^^^CCCD^NI", "QACC1", study_uid=study_uid))
    study = _store(his, make_ct(tmp_path / "q1.dcm", PatientID="001085099999", PatientName="PHAM^VAN D",
                                StudyInstanceUID=study_uid, AccessionNumber="QACC1"))
    _aa(his, _orm("BN9001^^^BVDK^PI~001085099999^^^CCCD^NI", "QACC2"))
    keys = ("PatientID", "IssuerOfPatientID", "OtherPatientIDsSequence")
    for accession in ("QACC1", "QACC2"):
        items = _worklist(his, tmp_path, accession, *keys)
        assert [(i.PatientID, i.IssuerOfPatientID) for i in items] == [("BN9001", "BVDK")], accession
        assert _other_ids(items[0]) == [("001085099999", "CCCD")]
    assert _cfind_names(his, StudyInstanceUID=study) == [("Phạm^Văn D", "BN9001", study)]
    meta = _metadata(his, study)[0]
    assert (meta["PatientID"], meta["IssuerOfPatientID"]) == ("BN9001", "BVDK")
    # Later messages by either ID reach the same patient.
    _aa(his, _orm("001085099999^^^CCCD^NI", "QACC3"))
    _aa(his, _orm("BN9001^^^BVDK^PI", "QACC4"))
    for accession in ("QACC3", "QACC4"):
        items = _worklist(his, tmp_path, accession, *keys)
        assert [(i.PatientID, _other_ids(i)) for i in items] == [("BN9001", [("001085099999", "CCCD")])]


# -- 5. an empty MSH-9 or MSH-10 is the message's fault ---------------------------------------
@pytest.mark.parametrize("field", [9, 10])
def test_empty_message_type_or_control_id_is_ae(his: PacsServer, field: int) -> None:
    fields = _adt("A08", "P700^^^BVDK^PI", "Test^A").split("|")
    fields[field - 1] = ""
    ack = send(his, "|".join(fields))
    assert msa(ack)[0] == "AE", ack
