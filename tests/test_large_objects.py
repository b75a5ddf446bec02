"""Objects larger than memory should hold: a CT volume or an ultrasound clip
in one object, sent by DCMTK storescu. The data set goes to a temporary file
once it passes a few MB (three 943 MB objects at once took 3.2 GB of RAM when
each was held whole), is stored byte for byte, and an object over
``max_object_bytes`` is refused without being kept."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from pacs.ingest import object_key
from storage import open_store

from .conftest import PacsServer
from .dicomfiles import make_ct
from .peers import dataset_bytes

MB = 1 << 20


def _big_ct(path: Path, megabytes: int) -> Path:
    """A multi-frame CT of about *megabytes* MB of 512 x 512 x 16-bit frames."""
    frames = megabytes * MB // (512 * 512 * 2)
    pixels = (np.arange(frames * 512 * 512, dtype=np.uint32) % 4093).astype("<u2").tobytes()
    return make_ct(path, Rows=512, Columns=512, NumberOfFrames=frames, PixelData=pixels)


def _peak_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


@pytest.mark.parametrize("backend", ["sqlite-fs", "pg-s3"], indirect=True)
def test_an_object_larger_than_memory_should_hold_is_stored_from_a_file(
    pacs_server: PacsServer, tmp_path: Path,
) -> None:
    """A 160 MB object is stored byte-identical while the server's peak
    memory grows by far less than the object (it grew by the object's size)."""
    path = _big_ct(tmp_path / "volume.dcm", 160)
    assert pacs_server.proc is not None
    before = _peak_rss_kb(pacs_server.proc.pid)
    assert pacs_server.storescu(str(path)).returncode == 0
    after = _peak_rss_kb(pacs_server.proc.pid)
    assert after - before < 64 * 1024, f"peak RSS grew by {(after - before) // 1024} MB for a 160 MB object"
    ds = dcmread(path, stop_before_pixels=True)
    backend = pacs_server.backend
    store = open_store(backend.storage_url or f"file://{pacs_server.data_dir / 'objects'}",
                       backend.env.get("PACS_S3_ACCESS_KEY"), backend.env.get("PACS_S3_SECRET_KEY"))
    stored_bytes = store.read_bytes(object_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    assert hashlib.sha256(dataset_bytes(stored_bytes)).digest() == \
        hashlib.sha256(dataset_bytes(path.read_bytes())).digest()
    # Nothing is left behind in the spool (its files have no name).
    assert os.listdir(pacs_server.data_dir / "dimse-spool") == []


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_an_object_over_the_size_limit_is_refused_and_the_next_is_taken(pacs_server: PacsServer,
                                                                      tmp_path: Path) -> None:
    """max_object_bytes 12 MB: a 24 MB object is refused 0xA701 (its bytes
    are not kept while the rest arrives); the server takes the next one."""
    pacs_server.stop()
    pacs_server.extra_env["PACS_MAX_OBJECT_BYTES"] = str(12 * MB)
    pacs_server.start()
    big, small = _big_ct(tmp_path / "big.dcm", 24), make_ct(tmp_path / "small.dcm")
    result = pacs_server.storescu("-v", str(big))
    assert "Refused: OutOfResources" in result.stderr, result.stderr[-2000:]  # DCMTK's name of A7xx
    assert "exceeds the limit of 12582912" in pacs_server.log_text()
    assert pacs_server.storescu(str(small)).returncode == 0
    stats = pacs_server.cli("stats", "--json").stdout
    assert '"instances": 1' in stats


def _spool_files(pid: int) -> int:
    """Deleted spool files the server process tree holds open."""
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    held = 0
    for each in pids:
        try:
            for fd in os.listdir(f"/proc/{each}/fd"):
                try:
                    held += "dimse-spool" in os.readlink(f"/proc/{each}/fd/{fd}")
                except OSError:
                    continue
        except OSError:
            continue
    return held


def test_a_sender_gone_in_the_middle_of_a_big_object_leaves_no_spool_file(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A modality killed (or a link dropped) half way through an object that
    went to the spool: the unnamed file is let go when the connection ends;
    it was held until a garbage collection (35 minutes were seen)."""
    import signal
    import subprocess

    from .conftest import make_backend
    from .peers import dcmtk, wait_until

    path = _big_ct(tmp_path / "volume.dcm", 400)
    server = PacsServer(tmp_path / "data", make_backend("sqlite-fs", request),
                        extra_env={"PACS_DICOM_TIMEOUT": "600"}).start()
    try:
        assert server.proc is not None
        pid = server.proc.pid
        sender = subprocess.Popen([dcmtk("storescu"), "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port),
                                   str(path)], env={**os.environ, "TCP_NODELAY": "1"})
        assert wait_until(lambda: _spool_files(pid) > 0 or sender.poll() is not None, timeout=60, interval=0.01)
        sender.send_signal(signal.SIGKILL)
        sender.wait()
        # When the connection ends: not when a later garbage collection finds
        # it (after ~30 s on an idle test server, 35 minutes on a busy one).
        assert wait_until(lambda: _spool_files(pid) == 0, timeout=10), "the spool file is still held"
        assert server.stats()["instances"] == 0
    finally:
        server.stop()
