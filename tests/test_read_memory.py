"""Ordinary reads of a big study keep `pacs serve`'s memory bounded and
start answering early: a study's metadata and its rendered images are
streamed an instance at a time, not built whole before the first byte
(10 metadata requests of a 2,500-instance study took the server to 725 MB;
rendered studies were rendered whole, and on, after the client had gone).

Peak memory is the server's VmHWM, reset before each measurement through
/proc/PID/clear_refs; "early" is shown by what the server does after the
first chunk has arrived, never by timings."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .peers import wait_until

STUDY = generate_uid()
BIG_SERIES = generate_uid()
SMALL_SERIES = generate_uid()
COUNT = 400
SIDE = 256
# Items in each instance's ReferencedImageSequence: ~20 KB of JSON per
# instance, ~8 MB for the series, so that building it whole shows.
REFERENCES = 150
MB = 1 << 20


def _instance(path: Path, series: str, number: int, rng: np.random.Generator, references: int) -> Path:
    refs = []
    for _ in range(references):
        ref = Dataset()
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = generate_uid()
        refs.append(ref)
    # Noise: its PNG does not compress, so each rendered part is ~64 KB.
    return make_ct(path, StudyInstanceUID=STUDY, SeriesInstanceUID=series, PatientName="MEMORY^READS",
                   PatientID="MEM1", InstanceNumber=number, ReferencedImageSequence=refs, Rows=SIDE, Columns=SIDE,
                   PixelData=rng.integers(0, 4096, SIDE * SIDE, dtype="<u2").tobytes())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """A server (SQLite + files, default render cache) holding one study:
    400 CT images with big headers, and a series of 3 for warming up."""
    tmp = tmp_path_factory.mktemp("read-memory")
    inbox = tmp / "in"
    inbox.mkdir()
    rng = np.random.default_rng(7)
    for n in range(1, COUNT + 1):
        _instance(inbox / f"big-{n}.dcm", BIG_SERIES, n, rng, REFERENCES)
    for n in range(1, 4):
        _instance(inbox / f"small-{n}.dcm", SMALL_SERIES, n, rng, REFERENCES)
    srv = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    srv.cli("import", str(inbox))
    srv.start()
    yield srv
    srv.stop()


def _rss_kb(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")))


def _reset_peak(pid: int) -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS; that RSS in kB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _rss_kb(pid, "VmRSS")


def _series_url(series: str) -> str:
    return f"/dicom-web/studies/{STUDY}/series/{series}"


def _sop_of(location: str) -> str:
    match = re.search(r"/instances/([0-9.]+)/rendered$", location)
    assert match, location
    return match.group(1)


def _parts(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip('"').encode()
    parts = []
    for piece in body.split(b"--" + boundary)[1:-1]:
        head, _, data = piece.strip(b"\r\n").partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append(({k.lower(): v for k, v in headers.items()}, data))
    return parts


def test_metadata_is_streamed_with_bounded_memory(server: PacsServer) -> None:
    """The series' metadata (~8 MB of JSON) starts without a Content-Length
    (chunked: written as built), is the same JSON array as before, and the
    server's peak memory grows by far less than the JSON (building the list
    and its text whole took ~15x the JSON size)."""
    assert server.proc is not None
    pid = server.proc.pid
    with server.http() as http:
        # Warm up the code path (imports, pydicom's dictionaries, threads).
        warm = http.get(_series_url(SMALL_SERIES) + "/metadata")
        assert warm.status_code == 200 and len(warm.json()) == 3
        before = _reset_peak(pid)
        with http.stream("GET", _series_url(BIG_SERIES) + "/metadata") as response:
            body = response.read()
        grown = _rss_kb(pid, "VmHWM") - before
    assert response.status_code == 200
    assert len(body) > 6 * MB
    assert grown * 1024 < len(body) // 2, \
        f"peak RSS grew by {grown // 1024} MB for {len(body) // MB} MB of metadata"
    assert response.headers["content-type"] == "application/dicom+json"
    assert "content-length" not in response.headers
    assert response.headers.get("transfer-encoding") == "chunked"
    instances = response.json()
    assert len(instances) == COUNT
    assert [i["00200013"]["Value"][0] for i in instances] == list(range(1, COUNT + 1))
    assert all(len(i["00081140"]["Value"]) == REFERENCES for i in instances)
    assert instances[0]["7FE00010"]["BulkDataURI"].endswith("/bulk/7FE00010")


def test_metadata_errors_before_the_first_byte_keep_their_status(server: PacsServer) -> None:
    """Study, series and instance metadata: unknown ones are 404, the
    instance level is an array of one, HEAD answers without a body."""
    with server.http() as http:
        assert http.get(f"/dicom-web/studies/{generate_uid()}/metadata").status_code == 404
        assert http.get(f"/dicom-web/studies/{STUDY}/series/{generate_uid()}/metadata").status_code == 404
        assert http.get(f"{_series_url(BIG_SERIES)}/instances/{generate_uid()}/metadata").status_code == 404
        assert http.get(f"/dicom-web/studies/{STUDY}/metadata", headers={"Accept": "image/png"}).status_code == 406
        small = http.get(_series_url(SMALL_SERIES) + "/metadata").json()
        sop = small[1]["00080018"]["Value"][0]
        one = http.get(f"{_series_url(SMALL_SERIES)}/instances/{sop}/metadata")
        assert one.status_code == 200 and one.json() == [small[1]]
        study = http.get(f"/dicom-web/studies/{STUDY}/metadata").json()
        assert len(study) == COUNT + 3
        head = http.head(f"/dicom-web/studies/{STUDY}/metadata")
        assert head.status_code == 200 and head.content == b""


def test_rendered_series_is_streamed_with_bounded_memory(server: PacsServer) -> None:
    """400 rendered images (~25 MB of PNG): every part arrives, and the
    server's peak memory grows by far less than the images (they were all
    rendered before the first byte, 8 MB of them held in memory, and all put
    in the render cache)."""
    assert server.proc is not None
    pid = server.proc.pid
    with server.http() as http:
        warm = http.get(_series_url(SMALL_SERIES) + "/rendered", headers={"Accept": "image/png"})
        assert warm.status_code == 200
        before = _reset_peak(pid)
        response = http.get(_series_url(BIG_SERIES) + "/rendered", headers={"Accept": "image/png"})
        grown = _rss_kb(pid, "VmHWM") - before
    assert response.status_code == 200 and "warning" not in response.headers
    parts = _parts(response.content, response.headers["content-type"])
    assert len(parts) == COUNT and all(body.startswith(b"\x89PNG") for _, body in parts)
    assert len(response.content) > 20 * MB
    assert grown * 1024 < len(response.content) // 4, \
        f"peak RSS grew by {grown // 1024} MB for {len(response.content) // MB} MB of rendered images"


def test_rendered_series_starts_before_the_last_image_is_rendered(server: PacsServer) -> None:
    """After the first chunk has arrived, the last instance's object is
    taken away: it is left out of the answer (rendered as it came to be
    sent, after the headers: the log says so), the others are all sent."""
    with server.http() as http:
        sops = [i["00080018"]["Value"][0] for i in http.get(_series_url(BIG_SERIES) + "/instances").json()]
        numbers = {i["00080018"]["Value"][0]: i["00200013"]["Value"][0]
                   for i in http.get(_series_url(BIG_SERIES) + "/instances",
                                     params={"includefield": "InstanceNumber"}).json()}
        last = max(sops, key=lambda s: numbers[s])
        files = [p for p in server.data_dir.rglob(f"{last}*") if p.is_file()]
        assert files, "the last instance's object is not in the data directory"
        aside = server.data_dir.parent / "aside"
        aside.mkdir(exist_ok=True)
        with http.stream("GET", _series_url(BIG_SERIES) + "/rendered", headers={"Accept": "image/png"}) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes()
            body = bytearray(next(chunks))
            moved = [(path, Path(shutil.move(path, aside / path.name))) for path in files]
            try:
                for chunk in chunks:
                    body += chunk
            finally:
                for original, moved_to in moved:
                    shutil.move(moved_to, original)
            content_type = response.headers["content-type"]
    sent = [_sop_of(h["content-location"]) for h, _ in _parts(bytes(body), content_type)]
    assert last not in sent
    assert len(sent) == COUNT - 1 and set(sent) == set(sops) - {last}
    assert "left out after the answer started" in server.log_text()


def test_rendering_stops_when_the_client_goes_away(server: PacsServer) -> None:
    """A client that reads the first chunk and hangs up: the server stops
    rendering the series there (it rendered all 400 before answering, and
    went on after a disconnect)."""
    url = f"http://127.0.0.1:{server.http_port}{_series_url(BIG_SERIES)}/rendered"
    with httpx.Client(headers=server.auth_headers, timeout=30) as client:
        with client.stream("GET", url, headers={"Accept": "image/jpeg"}) as response:
            assert response.status_code == 200
            next(response.iter_bytes())
        # Leaving the block closes the connection with the body unread.
    pattern = re.compile(r"rendered multipart stopped, client gone: (\d+) of (\d+) part")
    assert wait_until(lambda: pattern.search(server.log_text()) is not None, timeout=30), \
        "the server did not stop rendering when the client went away"
    match = pattern.search(server.log_text())
    assert match is not None
    assert int(match.group(1)) < int(match.group(2)) == COUNT
