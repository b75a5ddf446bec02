"""`pacs remote pull` without dates from an Orthanc that cuts its answers
(LimitFindResults): a reviewer's 14 dated studies were pulled, yet every run
said "studies without a Study Date: the remote answered 500 or more studies"
and exited 1. The undated warning now stands only when the remote may hold
such studies (its patient-level study count is more than the date windows
found, or it gives none), and says what the remote did (cut its answer with
0xFE00 after 5), not --find-limit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PacsServer, make_backend
from .peers import orthanc_old_pacs, run_dcmtk
from .test_remote_pull import ROOT, _instance, _uids

LIMIT = 5
# 14 dated studies of 3 patients (fewer than LIMIT: the patient answer is whole).
STUDIES = [(f"9{n:02d}", f"2025{1 + n % 12:02d}{1 + n:02d}", "101500", f"PR{n % 3}", f"Pull^Review{n % 3}", (1, 1))
           for n in range(14)]
UNDATED = ("999", "", "", "PR1", "Pull^Review1", (1, 1))


def _store(port: int, tmp: Path, study: tuple) -> None:
    path = tmp / f"{study[0]}.dcm"
    _instance(study, 1, 1).save_as(path, enforce_file_format=True)
    stored = run_dcmtk("storescu", "-aec", "OLDPACS", "127.0.0.1", str(port), str(path))
    assert stored.returncode == 0, stored.stderr


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PacsServer, int, Path]]:
    tmp = tmp_path_factory.mktemp("pullreview")

    class _Request:  # make_backend asks only for fixtures sqlite-fs does not need
        def getfixturevalue(self, name: str) -> None:
            raise AssertionError(name)

    ours = PacsServer(tmp / "data", make_backend("sqlite-fs", _Request())).start()  # type: ignore[arg-type]
    try:
        with orthanc_old_pacs(tmp / "orthanc", "OLDPACS", ours, LimitFindResults=LIMIT) as port:
            for study in STUDIES:
                _store(port, tmp, study)
            ours.cli("ae", "add", "OLDPACS", "--host", "127.0.0.1", "--port", str(port))
            yield ours, port, tmp
    finally:
        ours.stop()


def _pull(server: PacsServer, *args: str) -> tuple[int, dict, str]:
    result = server.cli("remote", "pull", "OLDPACS", *args, check=False)
    report = json.loads(result.stdout) if "--json" in args else {}
    return result.returncode, report, result.stdout + result.stderr


def test_a_complete_pull_from_a_remote_that_cuts_its_answers_exits_0(peers: tuple[PacsServer, int, Path]) -> None:
    ours, _port, _tmp = peers
    code, report, _ = _pull(ours, "--json")
    assert code == 0 and report["capped"] == [] and report["pulled"] == 14, report
    code, _report, text = _pull(ours)  # and again, in words: nothing to say about undated studies
    assert code == 0 and "14 already complete" in text and "Study Date" not in text, text


def test_an_undated_study_beyond_the_cut_is_said_with_what_the_remote_did(peers: tuple[PacsServer, int, Path]) -> None:
    ours, port, tmp = peers
    _store(port, tmp, UNDATED)
    code, report, _ = _pull(ours, "--json")
    undated_uid = f"{ROOT}999"
    if code == 0:  # Orthanc's cut answer held it: pulled, and the counts add up
        assert report["capped"] == [] and report["pulled"] == 1, report
    else:
        assert report["capped"] == ["studies without a Study Date"], report
        detail = report["capped_detail"]["studies without a Study Date"]
        assert f"OLDPACS cut its answer short after {LIMIT} studies (0xFE00" in detail, detail
        assert "it holds 15 studies and 14 were found by date" in detail, detail
        code, _report, text = _pull(ours)
        assert code == 1 and "500 or more" not in text and f"after {LIMIT} studies" in text, text
        # What it says to do works.
        code, report, _ = _pull(ours, "--json", "--patient", "PR1")
        assert code == 0 and report["pulled"] == 1, report
    assert undated_uid in _uids(ours, "study_uid")
