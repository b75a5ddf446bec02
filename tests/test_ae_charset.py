"""Answers without diacritics for a modality that reads no UTF-8
(``pacs ae add NAME --charset ascii``, migration 0027).

Many consoles in service in Vietnamese hospitals (older ultrasound, CR,
endoscopy) read only the default repertoire: "Nguyễn Văn An" sent in
ISO_IR 192 shows as mojibake on the console and goes into its images that
way. Such an AE gets its C-FIND and worklist answers as Vietnamese write a
name without diacritics ("Nguyen^Van An") and no Specific Character Set;
every other AE keeps every letter. Over real sockets: DCMTK findscu against
`pacs serve`, the order placed over HL7.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Backend, PacsServer
from .qr_corpus import import_corpus, study_uid
from .test_query_retrieve import findscu
from .test_worklist_ris import msa, orm, send, worklist

OLD, NEW = "OLD_US", "NEW_CT"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("ae-charset")
    srv = PacsServer(tmp / "data", Backend("sqlite", None, None, {}))
    import_corpus(srv, tmp / "corpus")
    added = json.loads(srv.cli("ae", "add", OLD, "--host", "127.0.0.1", "--port", "104", "--charset", "ascii",
                               "--json").stdout)
    assert added["charset"] == "ascii"
    srv.cli("ae", "add", NEW, "--host", "127.0.0.1", "--port", "105")
    srv.start()
    yield srv
    srv.stop()


def _all_ascii(path_or_ds: object) -> None:
    ds = path_or_ds
    for elem in ds:  # type: ignore[attr-defined]
        if elem.VR == "SQ":
            for item in elem.value:
                _all_ascii(item)
        elif isinstance(elem.value, bytes):
            continue
        else:
            assert str(elem.value).isascii(), elem


def test_c_find_answers_in_ascii_to_the_ae_that_asks_for_it(server: PacsServer, tmp_path: Path) -> None:
    keys = {"PatientName": "NGUYEN^VAN AN", "PatientID": "", "StudyInstanceUID": study_uid("S1"),
            "StudyDescription": "", "ReferringPhysicianName": "", "OtherPatientIDsSequence": ""}
    (old,) = findscu(server, tmp_path, "STUDY", keys, "-S", "-aet", OLD)
    assert "SpecificCharacterSet" not in old
    assert str(old.PatientName) == "Nguyen^Van An"
    _all_ascii(old)
    (new,) = findscu(server, tmp_path, "STUDY", keys, "-S", "-aet", NEW)
    assert new.SpecificCharacterSet == "ISO_IR 192" and str(new.PatientName) == "Nguyễn^Văn An"
    # The same matches and values but for the letters' marks.
    assert [e.tag for e in old] == [e.tag for e in new if e.keyword != "SpecificCharacterSet"]
    # An unknown calling AE (no allowlist) is answered in UTF-8 too.
    (unknown,) = findscu(server, tmp_path, "STUDY", keys, "-S", "-aet", "SOMEONE")
    assert str(unknown.PatientName) == "Nguyễn^Văn An"


def test_the_worklist_answers_in_ascii_to_the_ae_that_asks_for_it(server: PacsServer, tmp_path: Path) -> None:
    order = orm("CS1", "ASC001", name="Trần^Thị Bích Đào", pid="079190000999")
    assert msa(send(server, order))[0] == "AA"
    keys = ("AccessionNumber=ASC001", "PatientName", "ReferringPhysicianName", "RequestedProcedureDescription",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription",
            "ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName")
    (old,) = worklist(server, tmp_path, *keys, aet=OLD)
    assert "SpecificCharacterSet" not in old
    assert (str(old.PatientName), str(old.ReferringPhysicianName)) == ("Tran^Thi Bich Dao", "Do^Thanh Tung")
    assert old.RequestedProcedureDescription == "CT nguc khong can quang"
    _all_ascii(old)
    (new,) = worklist(server, tmp_path, *keys, aet=NEW)
    assert new.SpecificCharacterSet == "ISO_IR 192" and str(new.PatientName) == "Trần^Thị Bích Đào"
    assert new.RequestedProcedureDescription == "CT ngực không cản quang"


def test_the_charset_is_listed_kept_and_refused_when_unknown(server: PacsServer) -> None:
    listed = {ae["title"]: ae for ae in json.loads(server.cli("ae", "list", "--json").stdout)}
    assert (listed[OLD]["charset"], listed[NEW]["charset"]) == ("ascii", "utf-8")
    # Re-adding without --charset keeps it (a new address, the same console).
    server.cli("ae", "add", OLD, "--host", "127.0.0.1", "--port", "106")
    listed = {ae["title"]: ae for ae in json.loads(server.cli("ae", "list", "--json").stdout)}
    assert listed[OLD]["charset"] == "ascii"
    refused = server.cli("ae", "add", OLD, "--host", "127.0.0.1", "--port", "106", "--charset", "latin1",
                         check=False)
    assert refused.returncode == 2 and "latin1" in refused.stderr


def test_a_name_in_ascii_keeps_its_alphabetic_group_and_case() -> None:
    from pacs.names import ascii_text

    assert ascii_text("Trần^Thị Bích=ちば^ていこ", person_name=True) == "Tran^Thi Bich"
    assert ascii_text("NGUYỄN VĂN ĐỨC") == "NGUYEN VAN DUC"
    assert ascii_text("東京 CT") == "?? CT"
