"""`pacs remote pull`: copying an old PACS into ours, against DCMTK's dcmqrscp
as the old PACS (a real Q/R SCP with its own database, C-MOVE and C-GET)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from .conftest import PacsServer, make_backend
from .dicomfiles import image_dataset, make_ct
from .peers import dataset_bytes, dcmtk, free_port, orthanc_old_pacs, run_dcmtk, wait_port

ROOT = "1.2.826.0.1.3680043.8.498.4242."
# (study, date, time, patient ID, name, series x instances)
STUDIES = [
    ("1", "20240110", "081500", "079201000001", "Nguyễn^Văn An", (2, 3)),
    ("2", "20240110", "143000", "079201000002", "Trần^Thị Bình", (1, 2)),
    ("3", "20230505", "101010", "079201000003", "Lê^Văn Cường", (1, 2)),
    ("4", "20220101", "090000", "079201000004", "Phạm^Minh Đức", (2, 2)),
    ("5", "20191231", "235900", "079201000001", "Nguyễn^Văn An", (1, 1)),
    ("6", "", "", "079201000001", "Nguyễn^Văn An", (1, 1)),  # an old film scan without a date
    ("7", "20240110", "095959.5", "079201000007", "Hoàng^Minh Tuấn", (1, 1)),  # the hour's last fraction
    ("8", "20240110", "", "079201000008", "Đỗ^Thị Hoa", (1, 1)),  # no Study Time
]


def _instance(study: tuple, series: int, number: int) -> Dataset:
    key, day, clock, patient_id, name, _shape = study
    return image_dataset(sop_uid=f"{ROOT}{key}.{series}.{number}", SpecificCharacterSet="ISO_IR 192",
                         StudyInstanceUID=f"{ROOT}{key}", SeriesInstanceUID=f"{ROOT}{key}.{series}",
                         PatientID=patient_id, PatientName=name, StudyDate=day, StudyTime=clock,
                         AccessionNumber=f"ACC{key}", SeriesNumber=series, InstanceNumber=number, Rows=8, Columns=8,
                         PixelRepresentation=1, PixelData=(np.arange(64, dtype=np.int16) * number).tobytes())


@dataclass
class Legacy:
    """dcmqrscp serving the corpus as the hospital's old PACS."""

    port: int
    files: dict[str, Path]
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _corpus(tmp: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for study in STUDIES:
        series_count, per_series = study[5]
        for series in range(1, series_count + 1):
            for number in range(1, per_series + 1):
                ds = _instance(study, series, number)
                path = tmp / "legacy-src" / f"{ds.SOPInstanceUID}.dcm"
                path.parent.mkdir(exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
                files[str(ds.SOPInstanceUID)] = path
    return files


def _legacy(tmp: Path, ours: PacsServer) -> Iterator[Legacy]:
    db = tmp / "legacy-db"
    db.mkdir()
    files = _corpus(tmp)
    port = free_port()
    config = tmp / "dcmqrscp.cfg"
    config.write_text(
        f'NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n'
        f"HostTable BEGIN\nfilmless = ({ours.ae_title}, 127.0.0.1, {ours.dicom_port})\nHostTable END\n"
        "VendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nLEGACY {db} RW (200, 1024mb) ANY\nAETable END\n"
    )
    indexed = run_dcmtk("dcmqridx", str(db), *map(str, files.values()))
    assert indexed.returncode == 0, indexed.stderr
    log = tmp / "dcmqrscp.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([dcmtk("dcmqrscp"), "-d", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_port(port, timeout=30, proc=proc)
        ours.cli("ae", "add", "LEGACY", "--host", "127.0.0.1", "--port", str(port))
        yield Legacy(port, files, proc, log)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def ours(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path / "data", make_backend("sqlite-fs", request)).start()
    yield server
    server.stop()


@pytest.fixture
def legacy(tmp_path: Path, ours: PacsServer) -> Iterator[Legacy]:
    yield from _legacy(tmp_path, ours)


def _pull(server: PacsServer, *args: str) -> tuple[int, dict]:
    result = server.cli("remote", "pull", "LEGACY", "--json", *args, check=False)
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout)


def _stored(server: PacsServer) -> dict[str, bytes]:
    """Each instance's data set bytes, by SOP Instance UID."""
    core = server.core()
    try:
        return {item.sop_uid: dataset_bytes(core.store.read_bytes(item.storage_key)) for item in core.reader.iter_stored()}
    finally:
        core.close()


def _uids(server: PacsServer, level: str) -> set[str]:
    """The study_uid or sop_uid (*level*) of every instance the server holds."""
    core = server.core()
    try:
        return {getattr(item, level) for item in core.reader.iter_stored()}
    finally:
        core.close()


def test_pull_copies_an_old_pacs_newest_first_resumes_and_verifies(ours: PacsServer, legacy: Legacy) -> None:
    """The old PACS answers at most 2 matches per C-FIND here (--find-limit
    2): the whole range, then halves, then the day with four studies by hour
    (one at 09:59:59.5, one without a time: found in the day's answer)."""
    dates = ("--since", "20000101", "--until", "20301231")
    code, first = _pull(ours, "--find-limit", "2", "--max-studies", "2", *dates)
    assert code == 1 and first["stopped"].startswith("--max-studies 2")
    assert first["pulled"] == 2 and first["problems"] == []
    # Newest first: the two latest of 2024-01-10.
    assert {uid.rsplit(".", 1)[-1] for uid in _uids(ours, "study_uid")} == {"2", "7"}

    code, second = _pull(ours, "--find-limit", "2", *dates)
    assert code == 0, second
    assert (second["complete"], second["pulled"], second["studies"]) == (2, 5, 7)
    assert second["capped"] == [] and second["stopped"] == ""
    sent = {uid: dataset_bytes(path.read_bytes()) for uid, path in legacy.files.items() if not uid.startswith(f"{ROOT}6.")}
    assert _stored(ours) == sent  # every instance, byte for byte
    assert ours.stats()["studies"] == 7 and ours.stats()["patients"] == 6

    moves = legacy.log_text().count("Move Destination")
    code, third = _pull(ours, "--find-limit", "2", *dates)
    assert code == 0 and (third["complete"], third["pulled"]) == (7, 0)
    assert legacy.log_text().count("Move Destination") == moves  # nothing retrieved again

    audit = ours.cli("audit", "--format", "json").stdout
    assert audit.count("pull: ") == 7


def test_pull_takes_only_missing_series_and_names_what_it_cannot_get(ours: PacsServer, legacy: Legacy,
                                                                      tmp_path: Path) -> None:
    # One series of study 4 is already here (sent by the modality to both).
    here = [legacy.files[f"{ROOT}4.1.{n}"] for n in (1, 2)]
    assert ours.storescu(*map(str, here)).returncode == 0
    # The old PACS lost one file of study 1: listed, but it cannot send it.
    lost = legacy.files[f"{ROOT}1.2.3"]
    lost.rename(tmp_path / "lost.dcm")

    code, dry = _pull(ours, "--dry-run")
    assert code == 0 and dry["missing"] == 8 and dry["pulled"] == 0
    assert ours.stats()["instances"] == 2

    moves_before = legacy.log_text().count("Move Destination")
    code, report = _pull(ours)
    assert code == 1
    assert report["pulled"] == 7 and report["incomplete"] == 1 and report["complete"] == 0
    (problem,) = report["problems"]
    assert problem["study_uid"] == f"{ROOT}1" and problem["detail"].startswith("1 of 6 instances missing")
    # Study 4 came by its missing series only; the others whole: one move each.
    assert legacy.log_text().count("Move Destination") - moves_before == 8
    assert ours.stats()["instances"] == sum(s * n for *_x, (s, n) in STUDIES) - 1

    lost.parent.mkdir(exist_ok=True)
    (tmp_path / "lost.dcm").rename(lost)  # found again: the next run completes it
    code, again = _pull(ours)
    assert code == 0 and (again["pulled"], again["complete"]) == (1, 7)
    assert ours.stats()["instances"] == sum(s * n for *_x, (s, n) in STUDIES)


def test_pull_by_c_get_for_one_patient_and_a_date_range(tmp_path: Path, ours: PacsServer, legacy: Legacy) -> None:
    """C-GET needs neither our AE at the remote nor a running listener."""
    ours.stop()
    code, report = _pull(ours, "--method", "get", "--patient", "079201000001", "--since", "20200101")
    assert code == 0 and report["pulled"] == 1 and report["studies"] == 1, json.dumps(report)
    code, report = _pull(ours, "--method", "get", "--patient", "079201000001", "--until", "2019-12-31")
    assert code == 0 and report["pulled"] == 1
    assert _uids(ours, "study_uid") == {f"{ROOT}1", f"{ROOT}5"}
    # Without dates the undated study is found too. When the remote's limit
    # forces splitting by date, the undated ones of the first answer are
    # taken and the report says more may exist (exit 1).
    code, report = _pull(ours, "--method", "get", "--patient", "079201000001", "--find-limit", "3")
    assert code == 1 and report["capped"] == ["studies without a Study Date"], report
    assert (report["complete"], report["pulled"]) == (2, 1), report
    code, report = _pull(ours, "--method", "get", "--patient", "079201000001")
    assert code == 0 and (report["pulled"], report["complete"]) == (0, 3)


def test_pull_refuses_bad_arguments_and_unknown_or_unreachable_remotes(ours: PacsServer) -> None:
    bad = ours.cli("remote", "pull", "LEGACY", "--since", "2024-13-01", check=False)
    assert bad.returncode == 2 and "is not a date" in bad.stderr
    bad = ours.cli("remote", "pull", "LEGACY", "--find-limit", "1", check=False)
    assert bad.returncode == 2 and "at least 2" in bad.stderr
    unknown = ours.cli("remote", "pull", "NOSUCH", check=False)
    assert unknown.returncode == 1 and "not in the AE registry" in unknown.stdout + unknown.stderr
    ours.cli("ae", "add", "GONE", "--host", "127.0.0.1", "--port", str(free_port()))
    code_gone = ours.cli("remote", "pull", "GONE", "--json", check=False)
    assert code_gone.returncode == 1 and "association with GONE" in json.loads(code_gone.stdout)["stopped"]


def test_pull_from_orthanc_that_cuts_its_answers_short(tmp_path: Path, ours: PacsServer) -> None:
    """Orthanc as the old PACS, with its C-FIND caps: at LimitFindResults it
    ends the answer with 0xFE00 (more exist), which splits the window; at
    LimitFindInstances a study's instance list is cut short, which fails that
    study (it cannot be verified) and the pull goes on with the others."""
    files = _corpus(tmp_path)
    with orthanc_old_pacs(tmp_path / "orthanc", "LEGACY", ours, LimitFindResults=3, LimitFindInstances=2) as port:
        stored = run_dcmtk("storescu", "-aec", "LEGACY", "127.0.0.1", str(port), *map(str, files.values()))
        assert stored.returncode == 0, stored.stderr
        ours.cli("ae", "add", "LEGACY", "--host", "127.0.0.1", "--port", str(port))
        # Study 2 is here already with as many instances as Orthanc counts for
        # it, but of another series (the modality sent that one here only).
        other = []
        for number in (1, 2):
            ds = _instance(STUDIES[1], 9, number)
            other.append(tmp_path / f"other{number}.dcm")
            ds.save_as(other[-1], enforce_file_format=True)
        assert ours.storescu(*map(str, other)).returncode == 0

        code, report = _pull(ours)
        # Study 1 has a series of 3 instances, over the instance cap: failed,
        # named; the other dated studies came although every list of more than
        # 3 studies was cut short. The undated one is beyond the cut of the
        # first answer: said, not silently missed.
        assert code == 1, report
        (problem,) = report["problems"]
        assert problem["study_uid"] == f"{ROOT}1" and "LimitFindInstances" in problem["detail"], problem
        # 20240110 has four studies, one without a time: Orthanc's cut answer
        # for that day may have left it out, which is said too.
        assert report["pulled"] >= 5, report
        assert set(report["capped"]) == {"studies without a Study Date", "20240110: studies without a Study Time"}
        assert {f"{ROOT}{k}" for k in "23457"} <= _uids(ours, "study_uid")
        assert {f"{ROOT}2.1.1", f"{ROOT}2.1.2", f"{ROOT}2.9.1"} <= _uids(ours, "sop_uid")  # both series of 2

        # One patient's three studies fit in one answer: the undated one too.
        code, report = _pull(ours, "--patient", "079201000001")
        assert {f"{ROOT}5", f"{ROOT}6"} <= _uids(ours, "study_uid"), report
        assert report["capped"] == [] and [p["study_uid"] for p in report["problems"]] == [f"{ROOT}1"]

        # Run again: the complete studies are known by Orthanc's series counts.
        code, again = _pull(ours, "--since", "20190101")
        assert again["pulled"] == 0 and again["complete"] >= 5 and again["failed"] == 1, again


def test_counts_an_old_pacs_sends_are_read_or_ignored() -> None:
    from pacs.pull import _count

    assert [_count(v) for v in ("5", " 7 ", "1\\2", "abc", "", None)] == [5, 7, 1, None, None, None]


def _jobs(server: PacsServer) -> list[dict]:
    return list(json.loads(server.cli("route", "list", "--json", "--limit", "100000").stdout)["jobs"])


def test_what_a_pull_or_an_import_brings_in_is_not_routed(tmp_path: Path, ours: PacsServer, legacy: Legacy) -> None:
    """A migration is old data coming in, not examinations arriving: pulled
    (C-MOVE sub-operations whose Move Originator is our AE, or our own
    C-GET) or imported, it took the routing rules, and a rule such as "every
    CT to the AI server" sent it years of priors. A modality's objects still
    take them; `pacs import --route` asks for them (a CD for this visit)."""
    ours.cli("ae", "add", "AI_NODE", "--host", "127.0.0.1", "--port", str(free_port()))
    ours.cli("route", "add", "everything", "--if", "SOPClassUID~*", "--to-ae", "AI_NODE")
    code, report = _pull(ours, "--patient", "079201000001")
    assert code == 0 and report["pulled"] >= 1, report
    code, report = _pull(ours, "--method", "get")
    assert code == 0 and report["pulled"] >= 1, report
    assert _jobs(ours) == []

    (tmp_path / "cd").mkdir()
    cd = _instance(("9", "20260101", "080000", "079201000009", "Lê^Văn Chín", (1, 1)), 1, 1)
    cd.save_as(tmp_path / "cd" / "a.dcm", enforce_file_format=True)
    ours.cli("import", str(tmp_path / "cd"))
    assert _jobs(ours) == []
    cd.SOPInstanceUID = f"{ROOT}9.1.2"
    cd.save_as(tmp_path / "cd" / "b.dcm", enforce_file_format=True)
    ours.cli("import", "--route", str(tmp_path / "cd" / "b.dcm"))
    assert [j["sop_uid"] for j in _jobs(ours)] == [f"{ROOT}9.1.2"]

    ct = make_ct(tmp_path / "ct.dcm")  # a modality's examination
    sent = ours.storescu(str(ct))
    assert sent.returncode == 0, sent.stderr
    assert len(_jobs(ours)) == 2
