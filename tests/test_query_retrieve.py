"""Issue 3: C-FIND / C-MOVE / C-GET with DCMTK findscu, movescu, getscu and
storescp as the peers, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from .conftest import Backend, PacsServer, dataset_bytes, free_port, run_dcmtk, wait_port
from .dicomfiles import encode_dataset, image_dataset
from .peers import create_database, dcmtk, drop_database
from .qr_corpus import PATIENTS, series_uid, sop_uid, studies_of, study_uid, write_corpus


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def qr_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One archive holding the known corpus, per database, for the module."""
    tmp = tmp_path_factory.mktemp(f"qr-{request.param}")
    pg = create_database() if request.param == "pg" else None
    server = PacsServer(tmp / "data", Backend(request.param, pg, None, {}))
    corpus = write_corpus(tmp / "corpus")
    server.cli("import", str(tmp / "corpus"))
    server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(free_port()))
    server.corpus = corpus  # type: ignore[attr-defined]
    server.start()
    yield server
    server.stop()
    if pg:
        drop_database(pg)


def findscu(server: PacsServer, workdir: Path, level: str, keys: dict[str, str], model: str = "-S",
            *options: str) -> list[Dataset]:
    """Run DCMTK findscu; return the response identifiers it extracted."""
    out = workdir / f"find-{time.monotonic_ns()}"
    out.mkdir()
    args = [model, *options, "-X", "-od", str(out), "-aec", server.ae_title, "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}" if v is not None else k]
    result = run_dcmtk("findscu", *args, "127.0.0.1", str(server.dicom_port))
    assert result.returncode == 0, result.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def study_matches(server: PacsServer, tmp_path: Path, **keys: str) -> set[str]:
    rsp = findscu(server, tmp_path, "STUDY", {**keys, "StudyInstanceUID": ""})
    return {str(r.StudyInstanceUID) for r in rsp}


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"PatientName": "NGUYEN*"}, ("S1", "S2", "S3", "S5")),
        ({"PatientName": "nguyễn*"}, ("S1", "S2", "S3", "S5")),
        ({"PatientName": "Nguyễn^Văn An"}, ("S1", "S2", "S5")),
        ({"PatientName": "NGUYEN VAN AN"}, ("S1", "S2", "S5")),
        ({"PatientName": "nguyen^van*"}, ("S1", "S2", "S5")),
        ({"PatientName": "*THI*"}, ("S3",)),
        ({"PatientName": "?RAN*"}, ("S4",)),
        ({"PatientName": "*"}, ("S1", "S2", "S3", "S4", "S5", "S6")),
        ({"PatientID": "001085012345"}, ("S1", "S2")),
        ({"PatientID": "DN4797912345678"}, ("S1", "S2")),  # insurance number (other ID)
        ({"PatientID": "0010*"}, ("S1", "S2", "S4")),
        ({"StudyDate": "20240115"}, ("S1", "S5")),
        ({"StudyDate": "20240101-20240229"}, ("S1", "S2", "S5")),
        ({"StudyDate": "20240301-"}, ("S3", "S6")),
        ({"StudyDate": "-20231231"}, ("S4",)),
        ({"StudyTime": "080000-090000"}, ("S1",)),
        ({"AccessionNumber": "ACC00?"}, ("S1", "S2", "S3", "S5", "S6")),
        ({"AccessionNumber": "XYZ999"}, ("S4",)),
        ({"ModalitiesInStudy": "MR"}, ("S1", "S6")),
        ({"ModalitiesInStudy": "CT\\DX"}, ("S1", "S2", "S4", "S5")),
        ({"ReferringPhysicianName": "DO*"}, ("S1",)),
        ({"ReferringPhysicianName": "pham*"}, ("S4", "S5", "S6")),
        ({"StudyDescription": "CT*"}, ("S1", "S4")),
        ({"PatientName": "NGUYEN*", "ModalitiesInStudy": "CT"}, ("S1",)),
        ({"PatientName": "NOBODY*"}, ()),
    ],
)
def test_study_level_matching(qr_server: PacsServer, tmp_path: Path, keys: dict[str, str], expected: tuple[str, ...]) -> None:
    assert study_matches(qr_server, tmp_path, **keys) == studies_of(*expected)


def test_study_uid_list_matching(qr_server: PacsServer, tmp_path: Path) -> None:
    rsp = findscu(qr_server, tmp_path, "STUDY", {"StudyInstanceUID": study_uid("S1") + "\\" + study_uid("S3")})
    assert {str(r.StudyInstanceUID) for r in rsp} == studies_of("S1", "S3")


def test_study_return_keys(qr_server: PacsServer, tmp_path: Path) -> None:
    rsp = findscu(
        qr_server,
        tmp_path,
        "STUDY",
        {
            "StudyInstanceUID": study_uid("S1"),
            "PatientName": "",
            "PatientID": "",
            "ModalitiesInStudy": "",
            "NumberOfStudyRelatedSeries": "",
            "NumberOfStudyRelatedInstances": "",
            "AccessionNumber": "",
            "ReferringPhysicianName": "",
            "StudyDescription": "",
            "StudyDate": "",
            "OtherPatientIDsSequence": None,
        },
    )
    assert len(rsp) == 1
    r = rsp[0]
    assert r.SpecificCharacterSet == "ISO_IR 192"
    assert str(r.PatientName) == "Nguyễn^Văn An"  # every Vietnamese letter kept
    assert r.PatientID == "001085012345"
    assert list(r.ModalitiesInStudy) == ["CT", "MR"]
    assert int(r.NumberOfStudyRelatedSeries) == 2
    assert int(r.NumberOfStudyRelatedInstances) == 3
    assert r.AccessionNumber == "ACC001"
    assert str(r.ReferringPhysicianName) == "Đỗ^Thanh Tùng"
    assert r.StudyDescription == "CT ngực"
    assert r.StudyDate == "20240115"
    assert r.OtherPatientIDsSequence[0].PatientID == "DN4797912345678"
    assert r.OtherPatientIDsSequence[0].IssuerOfPatientID == "BHYT"
    assert r.RetrieveAETitle == qr_server.ae_title


ALL_STUDY_KEYS = {
    "StudyInstanceUID": "", "PatientName": "", "PatientID": "", "PatientBirthDate": "", "PatientSex": "",
    "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "",
    "AccessionNumber": "", "ReferringPhysicianName": "", "StudyDescription": "", "StudyDate": "", "StudyTime": "",
    "OtherPatientIDsSequence": None, "PatientAge": "",
}


def _answers(datasets: list[Dataset]) -> dict[str, dict[str, object]]:
    return {str(ds.StudyInstanceUID): ds.to_json_dict() for ds in datasets}


def test_answers_alike_in_every_syntax_and_pdu_size(qr_server: PacsServer, tmp_path: Path) -> None:
    """C-FIND pending responses are written by our own encoder for little
    endian syntaxes and by pydicom for big endian: findscu gets the same
    answers in implicit, explicit and big endian VR, and a peer taking 64-byte
    PDUs (command and identifier in many fragments) gets them too."""
    implicit = _answers(findscu(qr_server, tmp_path, "STUDY", ALL_STUDY_KEYS, "-S", "-xi"))
    assert len(implicit) == len(studies_of("S1", "S2", "S3", "S4", "S5", "S6"))
    assert _answers(findscu(qr_server, tmp_path, "STUDY", ALL_STUDY_KEYS, "-S", "-xe")) == implicit
    assert _answers(findscu(qr_server, tmp_path, "STUDY", ALL_STUDY_KEYS, "-S", "-xb")) == implicit
    assert implicit[study_uid("S1")]["00100010"]["Value"] == [{"Alphabetic": "Nguyễn^Văn An"}]

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", qr_server.dicom_port, ae_title=qr_server.ae_title, max_pdu=64)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    for keyword, value in ALL_STUDY_KEYS.items():
        setattr(identifier, keyword, [] if value is None else value)
    responses = list(assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    assert [int(s.Status) for s, _ in responses][-1] == 0x0000
    tiny = _answers([ds for s, ds in responses if int(s.Status) == 0xFF00])
    assert tiny == implicit



def test_bench_wire_client_counts_what_findscu_finds(qr_server: PacsServer, tmp_path: Path) -> None:
    """bench/dimse_wire.py, which times scenario 5's C-FIND, gets the same
    number of answers as findscu and a final Success, query after query."""
    from bench.dimse_wire import timed_finds

    keys = {"PatientName": "NGUYEN*", "StudyInstanceUID": ""}
    expected = len(findscu(qr_server, tmp_path, "STUDY", keys))
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "NGUYEN*"
    identifier.StudyInstanceUID = ""
    times, counts = timed_finds("127.0.0.1", qr_server.dicom_port, qr_server.ae_title,
                                StudyRootQueryRetrieveInformationModelFind, [identifier] * 3)
    assert counts == [expected] * 3 and expected == len(studies_of("S1", "S2", "S3", "S5"))
    assert all(t > 0 for t in times)


def test_patient_root_patient_level(qr_server: PacsServer, tmp_path: Path) -> None:
    rsp = findscu(
        qr_server, tmp_path, "PATIENT",
        {"PatientName": "NGUYEN*", "PatientID": "", "NumberOfPatientRelatedStudies": "",
         "NumberOfPatientRelatedInstances": ""},
        model="-P",
    )
    by_id = {r.PatientID: r for r in rsp}
    assert set(by_id) == {PATIENTS["P1"].pid, PATIENTS["P2"].pid, PATIENTS["P4"].pid}
    assert int(by_id[PATIENTS["P1"].pid].NumberOfPatientRelatedStudies) == 2
    assert int(by_id[PATIENTS["P1"].pid].NumberOfPatientRelatedInstances) == 4
    assert str(by_id[PATIENTS["P2"].pid].PatientName) == "Nguyễn^Thị Hoa"


def test_patient_root_study_level(qr_server: PacsServer, tmp_path: Path) -> None:
    rsp = findscu(qr_server, tmp_path, "STUDY", {"PatientID": PATIENTS["P1"].pid, "StudyInstanceUID": ""}, model="-P")
    assert {str(r.StudyInstanceUID) for r in rsp} == studies_of("S1", "S2")


@pytest.mark.parametrize("model", ["-S", "-P"])
def test_series_level(qr_server: PacsServer, tmp_path: Path, model: str) -> None:
    keys = {"StudyInstanceUID": study_uid("S1"), "SeriesInstanceUID": "", "Modality": "",
            "NumberOfSeriesRelatedInstances": "", "SeriesNumber": ""}
    if model == "-P":
        keys["PatientID"] = PATIENTS["P1"].pid
    rsp = findscu(qr_server, tmp_path, "SERIES", keys, model=model)
    got = {str(r.SeriesInstanceUID): (r.Modality, int(r.NumberOfSeriesRelatedInstances)) for r in rsp}
    assert got == {series_uid("S1", 0): ("CT", 2), series_uid("S1", 1): ("MR", 1)}
    ct_only = findscu(qr_server, tmp_path, "SERIES", {**keys, "Modality": "CT"}, model=model)
    assert [str(r.SeriesInstanceUID) for r in ct_only] == [series_uid("S1", 0)]


@pytest.mark.parametrize("model", ["-S", "-P"])
def test_image_level(qr_server: PacsServer, tmp_path: Path, model: str) -> None:
    keys = {"StudyInstanceUID": study_uid("S1"), "SeriesInstanceUID": series_uid("S1", 0),
            "SOPInstanceUID": "", "SOPClassUID": "", "InstanceNumber": ""}
    if model == "-P":
        keys["PatientID"] = PATIENTS["P1"].pid
    rsp = findscu(qr_server, tmp_path, "IMAGE", keys, model=model)
    assert {str(r.SOPInstanceUID) for r in rsp} == {sop_uid("S1", 0, 0), sop_uid("S1", 0, 1)}
    assert {int(r.InstanceNumber) for r in rsp} == {1, 2}
    listed = findscu(qr_server, tmp_path, "IMAGE",
                     {**keys, "SOPInstanceUID": sop_uid("S1", 0, 1)}, model=model)
    assert [str(r.SOPInstanceUID) for r in listed] == [sop_uid("S1", 0, 1)]


# -- failures over a real association (pynetdicom SCU) ---------------------------------
def _find_statuses(server: PacsServer, identifier: Dataset, model: str = StudyRootQueryRetrieveInformationModelFind) -> list[int]:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    statuses = [int(s.Status) for s, _ in assoc.send_c_find(identifier, model) if s is not None]
    assoc.release()
    return statuses


def _ident(**keys: str) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    "identifier",
    [
        _ident(PatientName="X*"),  # no QueryRetrieveLevel
        _ident(QueryRetrieveLevel="BOGUS", PatientName="X*"),
        _ident(QueryRetrieveLevel="STUDY", SeriesInstanceUID="1.2.3"),  # key below the level
        _ident(QueryRetrieveLevel="STUDY", StudyDate="2024-01-15"),  # not a DA value (PatientAge=030Y, an
        # optional key not matched on, is ignored now: PS3.4 C.2.2.1.3, test_query_conformance.py)
        _ident(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.*"),  # wildcard in a UID
    ],
)
def test_malformed_identifiers_get_a900(qr_server: PacsServer, identifier: Dataset) -> None:
    assert _find_statuses(qr_server, identifier)[-1] == 0xA900
    assert qr_server.alive()


def test_patient_level_refused_in_study_root(qr_server: PacsServer) -> None:
    assert _find_statuses(qr_server, _ident(QueryRetrieveLevel="PATIENT", PatientID="*"))[-1] == 0xA900
    ok = _find_statuses(
        qr_server, _ident(QueryRetrieveLevel="PATIENT", PatientID="*"), PatientRootQueryRetrieveInformationModelFind
    )
    assert ok[-1] == 0x0000 and ok.count(0xFF00) == len(PATIENTS)


def test_cancel_is_honoured(tmp_path: Path) -> None:
    """C-CANCEL stops a long C-FIND: fewer responses than matches, status 0xFE00.

    The client's receive window is kept small and it reads nothing while it
    cancels, so the server is blocked writing its answer when the C-CANCEL
    arrives, however fast it answers (a client reading as fast as the server
    writes saw the whole answer before its cancel landed)."""
    from bench.dimse_wire import WireFindSCU
    from bench.synthetic import LoadSpec, load

    from pacs.index import create_index_engine, upgrade_schema

    # The server writes ~1,000 matches per socket write; with an 8 KB window
    # its first write blocks, and the C-CANCEL is read meanwhile.
    studies = 6_000
    server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}))
    (tmp_path / "data").mkdir()
    engine = create_index_engine(f"sqlite:///{tmp_path}/data/index.sqlite")
    upgrade_schema(engine)
    load(engine, LoadSpec(studies=studies, instances_per_study=1))
    engine.dispose()
    server.start()
    identifier = _ident(QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="",
                        PatientID="", StudyDate="", StudyDescription="", AccessionNumber="",
                        ReferringPhysicianName="", ModalitiesInStudy="")
    try:
        scu = WireFindSCU("127.0.0.1", server.dicom_port, server.ae_title,
                          str(StudyRootQueryRetrieveInformationModelFind), receive_buffer=8192)
        try:
            message_id = scu.send_find(identifier)
            first, status = scu.read_responses(limit=1)
            assert first >= 1 and status is None
            scu.send_cancel(message_id)
            rest, status = scu.read_responses()
            assert status == 0xFE00
            assert first + rest < studies
            # Cancelled at once, before any answer: it may reach the server
            # before the request is served (pynetdicom dropped such a cancel).
            message_id = scu.send_find(identifier)
            scu.send_cancel(message_id)
            answered, status = scu.read_responses()
            assert status == 0xFE00 and answered < studies
        finally:
            scu.release()
        assert server.alive()
    finally:
        server.stop()


# -- C-MOVE and C-GET ----------------------------------------------------------------------
class StoreSCP:
    """DCMTK storescp as a move destination, bit-preserving."""

    def __init__(self, out: Path, accept_all: bool, flags: tuple[str, ...] = ()) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        args = [dcmtk("storescp"), "+B", *flags, "-od", str(out), "-aet", "MOVEDEST", str(self.port)]
        if accept_all:
            args.insert(1, "+xa")
        self.proc = subprocess.Popen(
            args, env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port, proc=self.proc)

    def received(self) -> dict[str, bytes]:
        return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f.read_bytes() for f in self.out.iterdir()}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _movescu(server: PacsServer, level: str, keys: dict[str, str], dest: str = "MOVEDEST") -> subprocess.CompletedProcess[str]:
    args = ["-S", "-v", "-aem", dest, "-aec", server.ae_title, "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    return run_dcmtk("movescu", *args, "127.0.0.1", str(server.dicom_port))


def _corpus_by_uid(server: PacsServer) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in server.corpus}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("level", "keys", "expected"),
    [
        ("STUDY", {"StudyInstanceUID": study_uid("S1")}, [sop_uid("S1", 0, 0), sop_uid("S1", 0, 1), sop_uid("S1", 1, 0)]),
        ("SERIES", {"StudyInstanceUID": study_uid("S6"), "SeriesInstanceUID": series_uid("S6", 0)},
         [sop_uid("S6", 0, 0), sop_uid("S6", 0, 1)]),
        ("IMAGE", {"StudyInstanceUID": study_uid("S1"), "SeriesInstanceUID": series_uid("S1", 0),
                   "SOPInstanceUID": sop_uid("S1", 0, 0) + "\\" + sop_uid("S1", 0, 1)},
         [sop_uid("S1", 0, 0), sop_uid("S1", 0, 1)]),
    ],
)
def test_movescu_to_storescp_byte_identical(
    qr_server: PacsServer, tmp_path: Path, level: str, keys: dict[str, str], expected: list[str]
) -> None:
    scp = StoreSCP(tmp_path / "dest", accept_all=True)
    try:
        qr_server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(scp.port))
        result = _movescu(qr_server, level, keys)
        assert result.returncode == 0, result.stderr
        assert "Final Move Response (Success)" in result.stderr
    finally:
        scp.stop()
    received = scp.received()
    assert set(received) == set(expected)
    sources = _corpus_by_uid(qr_server)
    for uid, data in received.items():
        assert dataset_bytes(data) == dataset_bytes(sources[uid].read_bytes()), f"{uid} changed in transit"


@pytest.mark.parametrize("flags", [(), ("+xi",)], ids=["uncompressed", "implicit-only"])
def test_move_transcodes_for_uncompressed_only_destination(qr_server: PacsServer, tmp_path: Path,
                                                           flags: tuple[str, ...]) -> None:
    # storescp default: uncompressed only; +xi: Implicit VR Little Endian only (old viewers)
    scp = StoreSCP(tmp_path / "dest", accept_all=False, flags=flags)
    try:
        qr_server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(scp.port))
        result = _movescu(qr_server, "STUDY", {"StudyInstanceUID": study_uid("S6")})
        assert result.returncode == 0, result.stderr
        assert "Final Move Response (Success)" in result.stderr
        assert len(scp.received()) == 2
    finally:
        scp.stop()
    sources = _corpus_by_uid(qr_server)
    for uid, data in scp.received().items():
        got = dcmread(io.BytesIO(data))
        assert got.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        original = dcmread(sources[uid])
        assert original.file_meta.TransferSyntaxUID == JPEG2000Lossless
        assert (got.pixel_array == original.pixel_array).all(), "lossless transcode changed pixels"


def test_move_counts_and_partial_failure(qr_server: PacsServer, tmp_path: Path) -> None:
    """Sub-operation counts in pending and final responses; a destination that
    cannot take some objects gives 0xB000 with the failed UIDs."""
    scp = StoreSCP(tmp_path / "dest", accept_all=True)
    try:
        qr_server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(scp.port))
        responses = _move_responses(qr_server, _ident(QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid("S1")))
    finally:
        scp.stop()
    pending = [r for r in responses if r.Status == 0xFF00]
    assert [int(r.NumberOfRemainingSuboperations) for r in pending] == [2, 1, 0]
    final = responses[-1]
    assert final.Status == 0x0000
    assert int(final.NumberOfCompletedSuboperations) == 3 and int(final.NumberOfFailedSuboperations) == 0


def _move_responses(server: PacsServer, identifier: Dataset, destination: str = "MOVEDEST") -> list[Dataset]:
    """Every C-MOVE-RSP status dataset pynetdicom's SCU receives."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    try:
        return [s for s, _ in assoc.send_c_move(identifier, destination, StudyRootQueryRetrieveInformationModelMove)
                if s is not None]
    finally:
        assoc.release()


def test_retrieve_by_patient_id_is_the_patient_id_not_another_id(qr_server: PacsServer, tmp_path: Path) -> None:
    """C-FIND finds a patient by an insurance or citizen number too, but a
    C-MOVE selects by Patient ID itself (PS3.4 C.4.2.2.1): one patient's other
    ID that is another's Patient ID must never export the wrong patient."""
    scp = StoreSCP(tmp_path / "dest", accept_all=True)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
    try:
        qr_server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(scp.port))
        finals = {}
        for pid in ("DN4797912345678", "001085012345"):  # P1's insurance number, then its Patient ID
            assoc = ae.associate("127.0.0.1", qr_server.dicom_port, ae_title=qr_server.ae_title)
            try:
                identifier = _ident(QueryRetrieveLevel="PATIENT", PatientID=pid)
                responses = [s for s, _ in assoc.send_c_move(identifier, "MOVEDEST",
                                                             PatientRootQueryRetrieveInformationModelMove) if s]
            finally:
                assoc.release()
            finals[pid] = responses[-1]
    finally:
        scp.stop()
    by_other = finals["DN4797912345678"]
    assert by_other.Status == 0x0000 and int(by_other.get("NumberOfCompletedSuboperations", 0)) == 0
    assert int(finals["001085012345"].NumberOfCompletedSuboperations) == len(scp.received()) > 0


def test_move_unknown_destination_is_a801(qr_server: PacsServer) -> None:
    responses = _move_responses(qr_server, _ident(QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid("S1")), "NOWHERE")
    assert [int(s.Status) for s in responses] == [0xA801]
    assert qr_server.alive()
    from .test_network_access import _events

    tried = [e for e in _events(qr_server, lambda evs: any("NOWHERE" in e["detail"] for e in evs))
             if "NOWHERE" in e["detail"]]
    assert [(e["action"], e["outcome"]) for e in tried] == [("export", "denied")]


@pytest.mark.parametrize(
    "keys",
    [
        {"QueryRetrieveLevel": "STUDY"},  # no unique key
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"},  # a wildcard is no UID
        {"QueryRetrieveLevel": "BOGUS", "StudyInstanceUID": "1.2.3"},
    ],
)
def test_refused_move_is_a900_and_never_contacts_the_destination(
    qr_server: PacsServer, tmp_path: Path, keys: dict[str, str]
) -> None:
    """PS3.4 C.4.2.1.5: an identifier the SCP cannot use is answered 0xA900
    with an Error Comment (it was 0xC515 once the destination was known)."""
    scp = StoreSCP(tmp_path / "dest", accept_all=True)
    try:
        qr_server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(scp.port))
        responses = _move_responses(qr_server, _ident(**keys))
        movescu = _movescu(qr_server, keys["QueryRetrieveLevel"], {k: v for k, v in keys.items() if k != "QueryRetrieveLevel"})
    finally:
        scp.stop()
    assert [int(r.Status) for r in responses] == [0xA900]
    assert responses[0].get("ErrorComment")
    assert "Final Move Response (Error: DataSetDoesNotMatchSOPClass)" in movescu.stderr, movescu.stderr
    assert not scp.received()
    # The same identifier over C-GET: 0xA900 too, and getscu releases cleanly
    # (a refusal carrying an empty Failed SOP Instance UID List made it abort).
    args = [f"{k}={v}" for k, v in keys.items()]
    getscu = run_dcmtk("getscu", "-v", "-S", "-od", str(tmp_path), "-aec", qr_server.ae_title,
                       *[a for arg in args for a in ("-k", arg)], "127.0.0.1", str(qr_server.dicom_port))
    assert "DataSetDoesNotMatchSOPClass" in getscu.stderr, getscu.stderr
    assert "Release Failed" not in getscu.stderr and "Aborting" not in getscu.stderr, getscu.stderr
    assert qr_server.alive()


def test_getscu_uncompressed_peer_gets_decoded_study(qr_server: PacsServer, tmp_path: Path) -> None:
    out = tmp_path / "got"
    out.mkdir()
    result = run_dcmtk(
        "getscu", "-S", "-od", str(out), "-aec", qr_server.ae_title,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid('S1')}",
        "127.0.0.1", str(qr_server.dicom_port),
    )
    assert result.returncode == 0, result.stderr
    files = list(out.iterdir())
    assert len(files) == 3
    sources = _corpus_by_uid(qr_server)
    for f in files:
        got = dcmread(f)
        assert got.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        original = dcmread(sources[str(got.SOPInstanceUID)])
        assert (got.pixel_array == original.pixel_array).all()


def test_pacs_remote_find_and_move_between_two_servers(qr_server: PacsServer, tmp_path: Path) -> None:
    # A second appliance pulls a prior study from the first.
    dest = PacsServer(tmp_path / "b", Backend("sqlite", None, None, {}), ae_title="PACS_B")
    dest.dicom_port = free_port()
    dest.cli("ae", "add", qr_server.ae_title, "--host", "127.0.0.1", "--port", str(qr_server.dicom_port))
    qr_server.cli("ae", "add", "PACS_B", "--host", "127.0.0.1", "--port", str(dest.dicom_port))
    dest.start()
    try:
        time.sleep(2.2)
        found = json.loads(
            dest.cli("remote", "find", qr_server.ae_title, "-k", "PatientName=lê*", "-k", "StudyInstanceUID=",
                     "--json").stdout
        )
        assert [f["StudyInstanceUID"] for f in found] == [study_uid("S6")]
        moved = json.loads(
            dest.cli("remote", "move", qr_server.ae_title, "--study", study_uid("S6"), "--json").stdout
        )
        assert moved["status"] == "0x0000" and moved["completed"] == 2 and moved["failed"] == 0
        assert dest.stats()["instances"] == 2
        got = json.loads(
            dest.cli("remote", "get", qr_server.ae_title, "--study", study_uid("S2"), "--json").stdout
        )
        assert got["completed"] == 1 and got["stored"] == 1
        assert dest.stats()["instances"] == 3
    finally:
        dest.stop()


def _part10_without_group_length(ds: Dataset) -> bytes:
    """A Part 10 file whose File Meta has no (0002,0000) group length (some
    archives write them): the stored-bytes sender must fall back, not fail."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    for elem in ds.file_meta:
        if elem.tag != 0x00020000:
            write_data_element(meta, elem)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + encode_dataset(ds)


def test_retrieve_sends_stored_bytes_of_large_and_odd_files(backend: Backend, tmp_path: Path) -> None:
    """C-MOVE and C-GET send the stored bytes as they are: a 2 MB object that
    spans many PDUs, and a file without a meta group length (fallback path)."""
    import numpy as np
    from pydicom.uid import generate_uid

    study = generate_uid()
    series = generate_uid()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files: dict[str, bytes] = {}
    for number, (rows, odd) in enumerate([(1024, False), (64, True)], start=1):
        ds = image_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, PatientName="BIG^FILE",
                           PatientID="079123456789", InstanceNumber=number, Rows=rows, Columns=rows, BitsStored=12,
                           HighBit=11, PixelData=(np.arange(rows * rows, dtype=np.uint16) % 4096).tobytes())
        path = corpus / f"{number}.dcm"
        if odd:
            path.write_bytes(_part10_without_group_length(ds))
        else:
            ds.save_as(path, enforce_file_format=True)
        files[str(ds.SOPInstanceUID)] = path.read_bytes()
    server = PacsServer(tmp_path / "data", backend)
    server.cli("import", str(corpus))
    scp = StoreSCP(tmp_path / "dest", accept_all=True)
    server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(scp.port))
    server.start()
    try:
        result = _movescu(server, "STUDY", {"StudyInstanceUID": study})
        assert result.returncode == 0, result.stderr
        assert "Final Move Response (Success)" in result.stderr
        got = tmp_path / "got"
        got.mkdir()
        result = run_dcmtk("getscu", "-S", "-od", str(got), "-aec", server.ae_title, "-k", "QueryRetrieveLevel=STUDY",
                           "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(server.dicom_port))
        assert result.returncode == 0, result.stderr
        assert server.alive()
    finally:
        scp.stop()
        server.stop()
    moved = scp.received()
    fetched = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f.read_bytes() for f in got.iterdir()}
    for received in (moved, fetched):
        assert set(received) == set(files)
        for uid, data in received.items():
            assert dataset_bytes(data) == dataset_bytes(files[uid]), f"{uid} changed in transit"
