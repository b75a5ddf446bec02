"""A full disk, or one at its low-water mark: STOW-RS, export, compress and
/health must say "out of space" (and stop, and clean up), not fail as if the
request or the images were bad.

The disks are small tmpfs mounts (root only), unmounted however a test ends.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from viewer_api.multipart import build_multipart_related

from .dicomfiles import make_ct
from .peers import Backend, PacsServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")

MB = 1024 * 1024
OUT_OF_RESOURCES = 0xA700
SQLITE_FS = Backend("sqlite-fs", None, None, {})


@contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A *size_mb* MB filesystem at *path*, unmounted on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        # Lazy: a file a failed test left open must not leave the mount behind.
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextmanager
def serving(data_dir: Path, **env: str) -> Iterator[PacsServer]:
    server = PacsServer(data_dir, SQLITE_FS)
    server.extra_env.update(env)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """A file that leaves about *leave* bytes free on *path*'s filesystem."""
    filler = path / "filler.bin"
    with open(filler, "wb") as f:
        remaining = free(path) - leave
        block = b"\0" * MB
        while remaining > 0:
            f.write(block[: min(MB, remaining)])
            remaining -= MB
    return filler


def failure_reasons(body: dict[str, Any]) -> list[int]:
    """FailureReason of every FailedSOPSequence item of a DICOM JSON STOW response."""
    items = body.get("00081198", {}).get("Value", [])
    return [item["00081197"]["Value"][0] for item in items]


def new_boundary() -> str:
    return "disk-full-" + generate_uid()[-12:]


def stow_streamed(server: PacsServer, megabytes: int, before_each: Callable[[], object] = lambda: None) -> Any:
    """STOW-RS of one part of *megabytes* MB of noise, sent as it is made (no
    Content-Length); *before_each* runs before each MB goes out."""
    boundary = new_boundary()

    def body() -> Iterator[bytes]:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\nDICM".encode()
        for _ in range(megabytes):
            before_each()
            yield os.urandom(MB)
        yield f"\r\n--{boundary}--\r\n".encode()

    with server.http() as http:
        return http.post("/dicom-web/studies", content=body(), headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})


def stow_small(server: PacsServer, tmp_path: Path) -> int:
    body, ct = build_multipart_related([("application/dicom", make_ct(tmp_path / "small.dcm").read_bytes())])
    with server.http() as http:
        return http.post("/dicom-web/studies", content=body,
                         headers={"Content-Type": ct, "Accept": "application/dicom+json"}).status_code


# -- 1: STOW-RS ---------------------------------------------------------------------------
def test_stow_on_a_full_disk_is_503_out_of_resources_and_leaves_no_spool(tmp_path: Path) -> None:
    """ENOSPC while spooling a part was an HTTP 500; it is the archive's lack
    of resources: 503 with FailureReason 0xA700, and the spool file is gone."""
    with tmpfs(tmp_path / "data", 40) as data, serving(data, PACS_MIN_FREE_BYTES="0") as server:
        r = stow_streamed(server, 60)
        assert r.status_code == 503, r.text
        assert failure_reasons(r.json()) == [OUT_OF_RESOURCES], r.text
        assert list((data / "stow-spool").iterdir()) == []
        assert free(data) > 30 * MB
        assert stow_small(server, tmp_path) == 200
        assert "Traceback" not in server.log_text()


def test_stow_refuses_at_the_low_water_mark_while_spooling(tmp_path: Path) -> None:
    """A body without Content-Length was spooled whole (the disk nearly
    filled) and only then refused by the ingest: the spool keeps the mark."""
    mark = 40 * MB
    with tmpfs(tmp_path / "data", 100) as data, serving(data, PACS_MIN_FREE_BYTES=str(mark)) as server:
        lowest = [free(data)]
        r = stow_streamed(server, 90, lambda: lowest.append(free(data)))
        assert r.status_code == 503, r.text
        assert failure_reasons(r.json()) == [OUT_OF_RESOURCES], r.text
        # The spool looks at free space every few MB: it may pass the mark by
        # that much, never by most of the body.
        assert min(lowest) > mark - 8 * MB, f"free space fell to {min(lowest)} bytes"
        assert list((data / "stow-spool").iterdir()) == []
        assert stow_small(server, tmp_path) == 200


def test_stow_with_a_content_length_over_the_mark_is_refused_before_the_body(tmp_path: Path) -> None:
    """A declared Content-Length that would take the disk below the mark is
    answered 503 + 0xA700 at once: a sender that waits for 100 Continue
    never sends the body."""
    mark = 32 * MB
    with tmpfs(tmp_path / "data", 64) as data, serving(data, PACS_MIN_FREE_BYTES=str(mark)) as server:
        boundary = new_boundary()
        request = (
            "POST /dicom-web/studies HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {server.token}\r\nAccept: application/dicom+json\r\n"
            f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}\r\n'
            f"Content-Length: {48 * MB}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
            sock.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                assert chunk, f"connection closed after {answer!r}"
                answer += chunk
            status_line = answer.split(b"\r\n", 1)[0]
            assert b" 503 " in status_line, status_line  # not "100 Continue"
            while chunk := sock.recv(65536):
                answer += chunk
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert failure_reasons(body) == [OUT_OF_RESOURCES], body
        assert stow_small(server, tmp_path) == 200


# -- 2: export --------------------------------------------------------------------------
def noise(rows: int, columns: int) -> bytes:
    return os.urandom(rows * columns * 2)


def small_values(rows: int, columns: int) -> bytes:
    """16-bit pixels of low entropy: JPEG-LS makes them much smaller."""
    return bytes(b for v in os.urandom(rows * columns) for b in (v & 0x0F, 0))


def store_study(server: PacsServer, tmp_path: Path, count: int, rows: int = 512, columns: int = 1024,
                pixels: Callable[[int, int], bytes] = noise) -> str:
    """A study of *count* 16-bit CT images of rows x columns, by STOW-RS."""
    study, series = generate_uid(), generate_uid()
    for start in range(0, count, 10):
        parts = []
        for i in range(start, min(count, start + 10)):
            path = make_ct(tmp_path / f"ct{i}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series,
                           Rows=rows, Columns=columns, PixelData=pixels(rows, columns))
            parts.append(("application/dicom", path.read_bytes()))
            path.unlink()
        body, ct = build_multipart_related(parts)
        with server.http() as http:
            r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ct})
        assert r.status_code == 200, r.text
    return study


def test_export_to_a_full_disk_stops_once_and_removes_the_partial_zip(tmp_path: Path) -> None:
    """ENOSPC was one warning per remaining object, and a large .partial stayed
    behind keeping the disk full: one message, non-zero exit, nothing left."""
    with serving(tmp_path / "data") as server:
        study = store_study(server, tmp_path, 40)  # ~40 MB
        with tmpfs(tmp_path / "out", 16) as out:
            result = server.cli("export", study, "--out", str(out / "study.zip"), check=False)
            assert result.returncode != 0
            said = result.stdout + result.stderr
            assert "disk full" in said, said
            assert said.count("No space left on device") == 1, said
            assert list(out.iterdir()) == []

            # A folder keeps its complete files (a rerun resumes) and no temporary one.
            result = server.cli("export", study, "--out", str(out / "folder"), check=False)
            assert result.returncode != 0
            said = result.stdout + result.stderr
            assert "disk full" in said and said.count("No space left on device") == 1, said
            files = [p for p in (out / "folder").rglob("*") if p.is_file()]
            assert files and all(p.name.endswith(".dcm") for p in files), files
            assert all(p.stat().st_size > 1024 * 1024 for p in files)


# -- 3, 4: compress ---------------------------------------------------------------------
def test_compress_leaves_an_object_too_large_to_re_encode_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-encoding holds an object about five times in memory (5 GB for a
    900 MB CT): objects over the bound are skipped with the reason, before
    they are read; the others are compressed."""
    from pacs.maintenance import compress

    # The package exports the function under the module's name.
    compress_module = importlib.import_module("pacs.maintenance.compress")

    with serving(tmp_path / "data") as server:
        big = store_study(server, tmp_path, 1, rows=512, columns=512, pixels=small_values)  # 512 KB
        small = store_study(server, tmp_path, 1, rows=64, columns=64, pixels=small_values)
        monkeypatch.setattr(compress_module, "MAX_REENCODE_BYTES", 256 * 1024, raising=False)
        pacs = server.core()
        try:
            report = compress(pacs, study_uids=[big, small])
        finally:
            pacs.close()
    data = report.as_dict()
    assert report.compressed == 1, data
    too_large = data["skipped"].get("too large to re-encode in memory")
    assert too_large and too_large["count"] == 1, data
    assert not report.failed.count


def test_compress_on_a_full_disk_says_disk_full_and_stops(tmp_path: Path) -> None:
    """ENOSPC writing the encoded object was reported as "pixels did not
    verify" for every image, and the run went on: it is "disk full", the run
    stops at the first, exits non-zero, and the index still matches the store."""
    with tmpfs(tmp_path / "data", 40) as data:
        with serving(data, PACS_MIN_FREE_BYTES="0") as server:
            store_study(server, tmp_path, 5, rows=1024, columns=1024, pixels=small_values)
        filler = fill(data, 256 * 1024)  # less than one encoded image
        result = server.cli("compress", "--json", check=False)
        assert result.returncode != 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert "verification failed" not in report["skipped"], report
        assert report["failed"]["count"] == 1 and report["candidates"] == 1, report
        assert "disk full" in report["failed"]["items"][0]["detail"], report
        assert report["stopped"] and "disk full" in report["stopped"], report
        filler.unlink()
        assert not list((data / "tmp").glob("compress-*.dcm"))
        server.cli("verify")  # index and store agree
        again = json.loads(server.cli("compress", "--json").stdout)
        assert again["compressed"] == 5 and not again["failed"]["count"], again


# -- 5: /health -------------------------------------------------------------------------
def test_health_says_the_index_is_full_when_its_disk_is(tmp_path: Path) -> None:
    """With the SQLite index's disk full every C-STORE is refused 0xA703, yet
    /health said "index": "ok": it is degraded (503) until there is room."""
    with tmpfs(tmp_path / "index", 100) as index_dir:
        backend = Backend("sqlite-fs", f"sqlite:///{index_dir / 'index.sqlite'}", None, {})
        server = PacsServer(tmp_path / "data", backend).start()
        try:
            with server.http() as http:
                ok = http.get("/health")
                assert ok.status_code == 200 and ok.json()["index"] == "ok", ok.text
                filler = fill(index_dir, 8 * MB)
                full = http.get("/health")
                assert full.status_code == 503, full.text
                assert full.json()["status"] == "degraded", full.text
                assert full.json()["index"].startswith("error"), full.text
                assert "full" in full.json()["index"], full.text
                assert full.json()["storage"] == "ok", full.text
                filler.unlink()
                again = http.get("/health")
                assert again.status_code == 200 and again.json()["index"] == "ok", again.text
        finally:
            server.stop()


# -- 6: migrate -------------------------------------------------------------------------
def test_migrate_to_a_full_target_stops_at_the_first_full_write(tmp_path: Path) -> None:
    """A target disk too small went on failing every remaining object, one
    by one, each with its own error: the run stops at the first, says why,
    leaves nothing half-copied, and a rerun with room completes the copy."""
    with serving(tmp_path / "data") as server:
        store_study(server, tmp_path, 12)  # ~1 MB each
    with tmpfs(tmp_path / "target", 5) as target:
        result = server.cli("migrate", "--to", f"file://{target}/objects", "--workers", "1", "--json", check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["stopped"] and "the target is full" in report["stopped"], report
        assert report["failed"]["count"] == 1 and 1 <= report["copied"] < 12 and not report["complete"], report
        copied = [p for p in (target / "objects").rglob("*.dcm")]
        assert len(copied) == report["copied"], copied
    with tmpfs(tmp_path / "target", 64) as target:
        done = json.loads(server.cli("migrate", "--to", f"file://{target}/objects", "--json").stdout)
        assert done["complete"] and done["copied"] == 12 and not done["stopped"], done
