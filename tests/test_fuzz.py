"""Issue 8: bad input, fuzzed -- the short CI run (the long one is
``python -m bench.fuzz``). Generators and drivers live in :mod:`tests.fuzzing`.

Every target gets a bounded number of Hypothesis examples; after each one the
server must still be alive, with no traceback in its log, and still take a
good DCMTK echo and store, a good HL7 order and ``GET /health``. Nothing here
measures time: hangs are caught by each driver's own socket/HTTP timeouts and
by pytest-timeout.

Example counts come from the environment so CI stays short and a developer
can raise them (FUZZ_TIMEOUT, in seconds, raises the per-test limit too)::

    FUZZ_INGEST=3000 FUZZ_PDU=2000 FUZZ_CSTORE=2000 FUZZ_HL7=2000 FUZZ_HTTP=50 FUZZ_WEB=2000 \\
        FUZZ_TIMEOUT=3600 .venv/bin/python -m pytest -s tests/test_fuzz.py
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .fuzzing import (
    Budget,
    PduCase,
    Tally,
    _pdu,
    assert_all_serving,
    core_on,
    env_flag,
    fuzz_cstore,
    fuzz_hl7,
    fuzz_http,
    fuzz_ingest,
    fuzz_pdus,
    fuzz_web,
    log_mark,
    pdu_checker,
    stored_path_values,
)
from .peers import Backend, PacsServer

# Examples per target (FUZZ_HTTP: per API operation). Chosen so the whole
# module runs in about a minute and a half on a 2-core CI machine.
INGEST = env_flag("FUZZ_INGEST", 400)
PDU = env_flag("FUZZ_PDU", 200)
CSTORE = env_flag("FUZZ_CSTORE", 200)
HL7 = env_flag("FUZZ_HL7", 200)
HTTP = env_flag("FUZZ_HTTP", 8)
WEB = env_flag("FUZZ_WEB", 150)

pytestmark = pytest.mark.timeout(env_flag("FUZZ_TIMEOUT", 300))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[PacsServer]:
    """One `pacs serve` (SQLite + files) for every network target."""
    data = workdir / "data"
    data.mkdir()
    server = PacsServer(data, Backend("sqlite-fs", None, None, {})).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def path_values(server: PacsServer, workdir: Path) -> dict[str, str]:
    """Real UIDs of a stored object, so HTTP handlers get past their 404s."""
    return stored_path_values(server, workdir)


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str],
           record_property: Callable[[str, object], None]) -> Iterator[list[Tally]]:
    """Prints each target's counts on the terminal even without -s (a failed
    run's too), and records them as junit properties."""
    tallies: list[Tally] = []
    yield tallies
    with capsys.disabled():
        for tally in tallies:
            print(f"\n{tally.line()} [{tally.detail()}]", end="")
    for tally in tallies:
        record_property(f"fuzz_{tally.target}_inputs", tally.inputs)
        record_property(f"fuzz_{tally.target}_crashes", tally.crashes)


def track(report: list[Tally], target: str) -> Tally:
    """A tally the report prints whether the run passes or fails."""
    report.append(Tally(target))
    return report[-1]


def finish(tally: Tally, minimum: int) -> None:
    assert tally.crashes == 0
    assert tally.inputs >= minimum, f"only {tally.inputs} inputs tried"


# -- in-process ----------------------------------------------------------------------
def test_fuzz_ingest(tmp_path: Path, report: list[Tally]) -> None:
    """Mutated Part 10 files into the core's ingest: stored or refused with
    0xA900/0xC000, never another exception; index and store stay consistent."""
    with core_on(tmp_path / "core") as pacs:
        tally = fuzz_ingest(pacs, Budget(INGEST), track(report, "ingest"))
    finish(tally, INGEST)
    # A mutation that keeps the object valid is stored; most are refused.
    assert any(k.startswith("0x") for k in tally.outcomes), tally.detail()


# -- the running server ----------------------------------------------------------
def test_fuzz_pdus(server: PacsServer, workdir: Path, report: list[Tally]) -> None:
    """Malformed PDUs and A-ASSOCIATE-RQs, and bad PDUs inside an
    association: answered with well-formed PDUs or a close, never a hang."""
    mark = log_mark(server)
    tally = fuzz_pdus(server, Budget(PDU), track(report, "pdu"))
    finish(tally, PDU)
    assert_all_serving(server, workdir, since=mark)


def test_fuzz_cstore(server: PacsServer, workdir: Path, report: list[Tally]) -> None:
    """Malformed datasets over valid C-STORE associations: every one gets a
    C-STORE response, success or a refusal status."""
    mark = log_mark(server)
    tally = fuzz_cstore(server, Budget(CSTORE), track(report, "cstore"))
    finish(tally, CSTORE)
    assert_all_serving(server, workdir, since=mark)


def test_fuzz_hl7(server: PacsServer, workdir: Path, report: list[Tally]) -> None:
    """Broken MLLP framing and broken HL7 v2: one ACK per framed message,
    then a clean close."""
    mark = log_mark(server)
    tally = fuzz_hl7(server, Budget(HL7), track(report, "hl7"))
    finish(tally, HL7)
    assert_all_serving(server, workdir, since=mark)


def test_fuzz_findings_replayed(server: PacsServer, workdir: Path, path_values: dict[str, str]) -> None:
    """Inputs with which the fuzz runs found server bugs, replayed every time."""
    mark = log_mark(server)
    # Two A-RELEASE-RQs in a row inside an association: when the second one
    # beat our A-RELEASE-RP, the association thread spun forever on the
    # unsendable response (CPU, log flood) and never closed the connection
    # (fixed in dicom_scp/server.py). A race: repeat it.
    check = pdu_checker(server.dicom_port, server.ae_title.encode())
    double_release = PduCase("double-release", _pdu(0x05, bytes(4)) * 2, associate=True)
    for _ in range(30):
        check(double_release)  # raises if the server keeps the connection open
    # ModalitiesInStudy below the study level was a 500 (pacs/query/matching.py).
    study = path_values["study"]
    with server.http() as http:
        for path in (f"/dicom-web/studies/{study}/series", f"/dicom-web/studies/{study}/instances"):
            found = http.get(path, params={"ModalitiesInStudy": "CT\\MR"})
            assert found.status_code == 200, found.text[:300]
            assert len(found.json()) == 1
            missed = http.get(path, params={"ModalitiesInStudy": "MR"})
            assert missed.status_code in (200, 204) and (not missed.content or missed.json() == [])
        # Rendered frames "1,2" of a single-frame instance started a multipart
        # stream and then failed on frame 2: a truncated body and a traceback
        # (viewer_api/wado.py now checks every frame number first).
        instance = (f"/dicom-web/studies/{study}/series/{path_values['series']}"
                    f"/instances/{path_values['sop']}")
        frames = http.get(f"{instance}/frames/1,2/rendered")
        assert frames.status_code == 404, frames.text[:300]
        assert "out of range" in frames.json()["error"]
        assert http.get(f"{instance}/frames/1/rendered").status_code == 200
    assert_all_serving(server, workdir, since=mark)


def test_fuzz_dicomweb(server: PacsServer, workdir: Path, path_values: dict[str, str], report: list[Tally]) -> None:
    """What /openapi.json cannot describe: QIDO parameters, Accept headers,
    frame lists, rendering parameters, WADO-URI and STOW-RS bodies. No 5xx."""
    mark = log_mark(server)
    tally = fuzz_web(server, Budget(WEB), path_values, tally=track(report, "dicomweb"))
    finish(tally, WEB)
    assert_all_serving(server, workdir, since=mark)


def test_fuzz_http_api(server: PacsServer, workdir: Path, path_values: dict[str, str], report: list[Tally]) -> None:
    """Schemathesis over every operation of /openapi.json, requests valid and
    invalid per the schema: no 5xx. Last: it creates and edits orders."""
    mark = log_mark(server)
    tally = fuzz_http(server, Budget(HTTP), path_values, tally=track(report, "http"))
    finish(tally, HTTP)
    assert_all_serving(server, workdir, since=mark)
