"""C-FIND, C-STORE, C-MOVE/C-GET and QIDO-RS messages encoded without pydicom's Dataset round trip: the bytes
must be exactly what pydicom and pynetdicom write for the same answer.

(The same responses over real associations, DCMTK findscu in each transfer
syntax and a peer with a tiny maximum PDU, are in test_query_retrieve.py.)
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pytest
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicom_scp.direct_send import message_pdus, p_data_pdu
from dicom_scp.find_responses import _pending_command
from dicom_scp.identifier_bytes import NotEncodable, can_encode, encode_identifier
from pacs.query import Level
from pacs.query.results import ResultShape

STUDY_KEYS = [
    "PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
    "StudyDescription", "StudyInstanceUID", "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries",
    "PatientBirthDate", "PatientSex", "ReferringPhysicianName", "OtherPatientIDsSequence",
    "NumberOfPatientRelatedStudies",
    # not indexed: returned empty, whatever their VR
    "ReferencedStudySequence", "PatientAge", "PatientWeight", "StudyComments",
]
IMAGE_KEYS = ["SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
              "ContentDate", "AvailableTransferSyntaxUID"]

ROWS: list[dict[str, Any]] = [
    {  # Vietnamese names, an odd-length UID, two other IDs, several modalities
        "PatientName": "Nguyễn^Văn An", "PatientID": "001085012345", "StudyDate": "20261101", "StudyTime": "101010",
        "AccessionNumber": "ACC1", "ModalitiesInStudy": "CT\\SR", "StudyDescription": "CT ngực có cản quang",
        "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.123", "NumberOfStudyRelatedInstances": 312,
        "NumberOfStudyRelatedSeries": 3, "PatientBirthDate": "19800101", "PatientSex": "M",
        "ReferringPhysicianName": "Đỗ^Thanh Tùng", "NumberOfPatientRelatedStudies": 2,
        "OtherPatientIDsSequence": [
            {"PatientID": "DN4797912345678", "IssuerOfPatientID": "BHYT", "TypeOfPatientID": "TEXT"},
            {"PatientID": "0123", "IssuerOfPatientID": "", "TypeOfPatientID": ""},
        ],
    },
    {  # empty and missing values
        "PatientName": "", "PatientID": "X", "StudyDate": None, "StudyInstanceUID": "1.2.3.44",
        "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": 0, "OtherPatientIDsSequence": [],
    },
    {"SOPInstanceUID": "1.2.3.4.5", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "InstanceNumber": 7,
     "Rows": 512, "Columns": 2048, "NumberOfFrames": 1, "ContentDate": "20240101",
     "AvailableTransferSyntaxUID": "1.2.840.10008.1.2.4.90", "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.1"},
]



def pynetdicom_command(message: Any, primitive: Any) -> bytes:
    """The command set pynetdicom encodes for *primitive* in *message* (a DIMSE message class instance)."""
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)

@pytest.mark.parametrize("explicit", [False, True], ids=["implicit", "explicit"])
@pytest.mark.parametrize(("level", "keys", "row"), [
    (Level.STUDY, STUDY_KEYS, ROWS[0]),
    (Level.STUDY, STUDY_KEYS, ROWS[1]),
    (Level.PATIENT, ["PatientName", "OtherPatientIDsSequence", "NumberOfPatientRelatedInstances"], ROWS[0]),
    (Level.SERIES, ["Modality", "SeriesNumber", "BodyPartExamined"], {"SeriesNumber": 2, "Modality": "CT"}),
    (Level.IMAGE, IMAGE_KEYS, ROWS[2]),
])
def test_identifier_bytes_equal_pydicoms(level: Level, keys: list[str], row: dict[str, Any], explicit: bool) -> None:
    shape = ResultShape(level, keys, "FILMLESS")
    assert can_encode(shape)
    expected = encode(shape.dataset(row), not explicit, True, False)
    assert encode_identifier(shape, row, explicit) == expected


def test_values_pydicom_would_write_differently_are_refused() -> None:
    """Non-ASCII text in an ASCII VR takes pydicom's path, not a guess."""
    shape = ResultShape(Level.STUDY, ["PatientSex"], "FILMLESS")
    with pytest.raises(NotEncodable):
        encode_identifier(shape, {"PatientSex": "Đ", "StudyInstanceUID": "1.2"}, False)
    # An ambiguous VR ("US or SS") is left to pydicom for the whole query.
    assert not can_encode(ResultShape(Level.IMAGE, ["SmallestImagePixelValue"], "FILMLESS"))


def test_pending_command_set_is_pynetdicoms() -> None:
    request = C_FIND()
    request.MessageID = 7
    request.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
    # What pynetdicom's C-FIND service builds for each pending response.
    rsp = C_FIND()
    rsp.MessageID = request.MessageID
    rsp.MessageIDBeingRespondedTo = request.MessageID
    rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
    rsp.Status = 0xFF00
    rsp.Identifier = BytesIO(b"identifier")
    message = C_FIND_RSP()
    message.primitive_to_message(rsp)
    assert _pending_command(request) == encode(message.command_set, True, True)


@pytest.mark.parametrize("max_pdu", [0, 64, 100, 16384])
def test_message_fragments_are_pynetdicoms(max_pdu: int) -> None:
    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = 3
    rsp.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
    rsp.Status = 0xFF00
    identifier = bytes(range(256)) * 3
    rsp.Identifier = BytesIO(identifier)
    message = C_FIND_RSP()
    message.primitive_to_message(rsp)
    expected = [p_data_pdu(cx, pdv) for pdata in message.encode_msg(5, max_pdu)
                for cx, pdv in pdata.presentation_data_value_list]
    command = encode(message.command_set, True, True)
    assert list(message_pdus(5, command, identifier, max_pdu)) == expected


@pytest.mark.parametrize(("status", "sop_class", "sop_uid"), [
    (0x0000, "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.9.7134.1.2.3"),
    (0xB000, "1.2.840.10008.5.1.4.1.1.7", "1.2.3.44"),
    (0xA700, "1.2.840.10008.5.1.4.1.1.2", None),
])
def test_store_response_command_is_pynetdicoms(status: int, sop_class: str, sop_uid: str | None) -> None:
    """The C-STORE-RSP sent for every received object, hand-encoded."""
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_scp.direct_send import response_command

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 12
    rsp.AffectedSOPClassUID = sop_class
    if sop_uid:
        rsp.AffectedSOPInstanceUID = sop_uid
    rsp.Status = status
    assert response_command(rsp) == pynetdicom_command(C_STORE_RSP(), rsp)
    rsp.ErrorComment = "storage full"
    assert response_command(rsp) is None  # pynetdicom's path for the rest


@pytest.mark.parametrize("kind", ["move", "get"])
@pytest.mark.parametrize(("status", "counts"), [(0xFF00, (10, 2, 0, 1)), (0x0000, (None, 300, 0, 0))])
def test_retrieve_response_command_is_pynetdicoms(kind: str, status: int, counts: tuple[int | None, ...]) -> None:
    """C-MOVE / C-GET responses without an identifier (one per sub-operation)."""
    from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP
    from pynetdicom.dimse_primitives import C_GET, C_MOVE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    from dicom_scp.direct_send import response_command

    rsp = C_MOVE() if kind == "move" else C_GET()
    rsp.MessageIDBeingRespondedTo = 4
    rsp.AffectedSOPClassUID = MOVE if kind == "move" else GET
    rsp.Status = status
    (rsp.NumberOfRemainingSuboperations, rsp.NumberOfCompletedSuboperations,
     rsp.NumberOfFailedSuboperations, rsp.NumberOfWarningSuboperations) = counts
    assert response_command(rsp) == pynetdicom_command(C_MOVE_RSP() if kind == "move" else C_GET_RSP(), rsp)
    rsp.Identifier = BytesIO(b"failed list")
    assert response_command(rsp) is None


@pytest.mark.parametrize(("originator", "originator_id"), [("MOVESCU", 3), ("ODD_AE_TITLE1", 65535), (None, None)])
def test_store_request_command_is_pynetdicoms(originator: str | None, originator_id: int | None) -> None:
    """The C-STORE-RQ of each C-MOVE / C-GET sub-operation."""
    from pathlib import Path

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_scp.direct_send import store_request_command

    req = C_STORE()
    req.MessageID = 7
    req.Priority = 2
    req.MoveOriginatorApplicationEntityTitle = originator
    req.MoveOriginatorMessageID = originator_id
    req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    req.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.9.7134.5"
    req._dataset_path = (Path("x"), 0)  # a dataset follows
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    assert store_request_command("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.9.7134.5", 7, 2,
                                 originator, originator_id) == encode(message.command_set, True, True)


@pytest.mark.parametrize(("level", "keys", "row"), [
    (Level.STUDY, STUDY_KEYS, ROWS[0]),
    (Level.STUDY, STUDY_KEYS, ROWS[1]),
    (Level.STUDY, STUDY_KEYS, {**ROWS[0], "PatientName": "Yamada^Tarou=山田^太郎", "StudyDescription": "A\\B"}),
    (Level.IMAGE, IMAGE_KEYS, ROWS[2]),
])
def test_qido_json_equals_pydicoms(level: Level, keys: list[str], row: dict[str, Any]) -> None:
    """QIDO-RS matches written straight from index values are the DICOM JSON
    pydicom writes for the same dataset (or come from pydicom when they need it)."""
    from viewer_api.dicomjson import to_json
    from viewer_api.qido import _match_json

    shape = ResultShape(level, keys, "FILMLESS")
    ds = shape.dataset(row)
    ds.RetrieveURL = "http://127.0.0.1:8042/dicom-web/studies/1.2.3"
    expected = to_json(ds, drop=("QueryRetrieveLevel",))
    got = _match_json(shape, row, "http://127.0.0.1:8042/dicom-web/studies/1.2.3")
    assert got == expected


@pytest.mark.parametrize(("originator", "originator_id", "priority"), [("MOVESCU", 3, 2), (None, None, 0), ("A", 1, 1)])
def test_store_request_parsed_as_pynetdicom_parses_it(originator: str | None, originator_id: int | None,
                                                     priority: int) -> None:
    """dicom_scp/direct_receive.py reads a C-STORE-RQ command set into the
    primitive pynetdicom's own decoder makes of it."""
    from pynetdicom.dimse_messages import C_STORE_RQ

    from dicom_scp.direct_receive import parse_store_request
    from dicom_scp.direct_send import store_request_command

    command = store_request_command("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.9.7134.77", 9, priority,
                                    originator, originator_id)
    message = C_STORE_RQ()
    message.command_set = decode(BytesIO(command), True, True)
    message.data_set = BytesIO(b"dataset")
    expected = message.message_to_primitive()
    got = parse_store_request(command)
    assert got is not None
    for name in ("MessageID", "Priority", "AffectedSOPClassUID", "AffectedSOPInstanceUID",
                 "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID"):
        assert getattr(got, name) == getattr(expected, name), name


@pytest.mark.parametrize("status", [0x0000, 0xFE00, 0xA700, 0xC000])
def test_find_final_response_command_is_pynetdicoms(status: int) -> None:
    """The final C-FIND-RSP (no identifier), hand-encoded; pending ones and
    those with an Error Comment are left to pynetdicom."""
    from pynetdicom.sop_class import ModalityWorklistInformationFind

    from dicom_scp.direct_send import response_command

    for sop_class in (StudyRootQueryRetrieveInformationModelFind, ModalityWorklistInformationFind):
        rsp = C_FIND()
        rsp.MessageIDBeingRespondedTo = 9
        rsp.AffectedSOPClassUID = sop_class
        rsp.Status = status
        assert response_command(rsp) == pynetdicom_command(C_FIND_RSP(), rsp)
        rsp.ErrorComment = "query failed"
        assert response_command(rsp) is None
    pending = C_FIND()
    pending.MessageIDBeingRespondedTo, pending.AffectedSOPClassUID, pending.Status = 9, sop_class, 0xFF00
    pending.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    assert response_command(pending) is None


def test_other_command_sets_are_left_to_pynetdicom() -> None:
    from dicom_scp.direct_receive import parse_store_request
    from dicom_scp.direct_send import encode_command, response_command, store_request_command

    from pynetdicom.dimse_primitives import C_STORE

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.AffectedSOPClassUID, rsp.Status = 1, "1.2.3", 0
    assert parse_store_request(response_command(rsp) or b"") is None  # a response
    good = store_request_command("1.2.3", "1.2.3.4", 1, 2, None, None)
    assert parse_store_request(good) is not None
    assert parse_store_request(good[:-3]) is None  # cut short
    assert parse_store_request(good + encode_command([(0x0902, "UI", "x")])[12:]) is None  # unexpected element
    bad_priority = store_request_command("1.2.3", "1.2.3.4", 1, 7, None, None)
    assert parse_store_request(bad_priority) is None  # refused by pynetdicom's setter: its path decides


@pytest.mark.parametrize(("sop_uid", "direct"), [
    ("1.2.826.0.1.3680043.9.7134.77", True), ("1.2.0.3", True),
    ("1.02.3", False),  # a leading zero: pynetdicom warns, so its path takes it
    ("1.2." + "3" * 62, False),  # over 64 characters: pynetdicom refuses it
])
def test_only_conformant_store_requests_are_served_directly(sop_uid: str, direct: bool) -> None:
    """dicom_scp/direct_receive.py serves a C-STORE-RQ itself only when
    pynetdicom's setters would take its UIDs without a word."""
    from dicom_scp.direct_receive import parse_direct_store
    from dicom_scp.direct_send import store_request_command

    command = store_request_command("1.2.840.10008.5.1.4.1.1.2", sop_uid, 7, 1, None, None)
    got = parse_direct_store(command)
    assert (got is not None) == direct
    if got is not None:
        assert (got.sop_class, got.sop_uid, got.message_id, got.priority) == (
            "1.2.840.10008.5.1.4.1.1.2", sop_uid, 7, 1)
