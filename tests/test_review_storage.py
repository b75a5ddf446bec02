"""Storage review fixes, on real peers (SeaweedFS S3 behind a TCP link that
drops, PostgreSQL, DCMTK storescu into `pacs serve`, the `pacs` CLI):

- an S3 read cut off mid-object (the S3 server restarting, a network reset)
  escaped the store as urllib3's ProtocolError instead of a StorageError:
  `pacs verify` and `pacs migrate` ended in "error: ProtocolError" with no
  report, where one unreadable object should be reported and the run go on;
- the same cut while a C-GET or C-MOVE streamed that object into its C-STORE
  left the message unfinished and sent the next one inside it (a garbled
  association; getscu exited 0 with objects missing): now aborted;
- a resend of an indexed instance whose S3 object was lost (keep-first
  answers resends from the index) now stores it again;
- the file store's listing (reindex, verify) walks shard folders linked
  from another disk and fails on a folder it cannot read, not skipping it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from storage import StorageError, open_store

from .conftest import S3_ACCESS, S3_SECRET, Backend, PacsServer, S3Server, free_port, run_dcmtk
from .dicomfiles import make_ct, multiframe_rgb
from .link_proxy import LinkProxy

S3_ENV = {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET}
BIG = 20 * 256 * 256 * 3  # pixel bytes of the multi-frame object (~3.9 MB)
CUT = 1_500_000  # bytes the link lets through per connection before it drops


def _json(server: PacsServer, *args: str, rc: int = 0) -> dict[str, Any]:
    result = server.cli(*args, "--json", check=False)
    assert result.returncode == rc, f"pacs {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture
def dropping_link(s3_server: S3Server) -> Any:
    """A link to the S3 server that passes everything until told to drop."""
    proxy = LinkProxy(free_port(), int(s3_server.endpoint.rsplit(":", 1)[1])).start()
    yield proxy
    proxy.stop()


def test_an_s3_read_cut_mid_object_is_a_storage_error(dropping_link: LinkProxy, s3_bucket_url: str) -> None:
    data = os.urandom(4_000_000)
    direct = open_store(s3_bucket_url, S3_ACCESS, S3_SECRET)
    try:
        direct.put("1.2.3/4.5.6/7.8.9.dcm", io.BytesIO(data), len(data))
    finally:
        direct.close()
    dropping_link.cut_down = CUT
    bucket = s3_bucket_url.split("://", 1)[1].split("?", 1)[0]
    store = open_store(f"s3://{bucket}?endpoint=127.0.0.1:{dropping_link.port}&secure=false", S3_ACCESS, S3_SECRET,
                       create=False)
    try:
        with pytest.raises(StorageError), store.open("1.2.3/4.5.6/7.8.9.dcm") as stream:
            stream.read()
        with pytest.raises(StorageError):
            store.checksum("1.2.3/4.5.6/7.8.9.dcm")
        with pytest.raises(StorageError), store.local_path("1.2.3/4.5.6/7.8.9.dcm"):
            pass
    finally:
        store.close()
    assert dropping_link.cuts >= 3


def test_verify_and_migrate_report_an_s3_read_cut_mid_object_and_go_on(
        tmp_path: Path, dropping_link: LinkProxy, s3_bucket_url: str) -> None:
    """The S3 server restarting while `pacs verify` reads a multi-frame
    object: that object is unreadable (exit 1, in the report), the others
    are checked; `pacs migrate` copies the others, reports the one, and a
    rerun once S3 answers again completes the copy."""
    bucket = s3_bucket_url.split("://", 1)[1].split("?", 1)[0]
    through_link = f"s3://{bucket}?endpoint=127.0.0.1:{dropping_link.port}&secure=false"
    archive = PacsServer(tmp_path / "data", Backend("sqlite-s3", None, through_link, S3_ENV))
    _, _, big_uid = multiframe_rgb(tmp_path / "big.dcm", 20, 256, 256)
    small = make_ct(tmp_path / "small.dcm")
    imported = archive.cli("import", str(tmp_path / "big.dcm"), str(small), check=False)
    assert imported.returncode == 0, imported.stdout + imported.stderr

    dropping_link.cut_down = CUT
    checked = _json(archive, "verify", rc=1)
    assert checked["checked"] == 2 and checked["corrupt"]["count"] == 0 and checked["missing"]["count"] == 0
    assert [item["sop_uid"] for item in checked["unreadable"]["items"]] == [big_uid]

    target = tmp_path / "new-objects"
    copied = _json(archive, "migrate", "--to", f"file://{target}", rc=1)
    assert copied["copied"] == 1 and copied["failed"]["count"] == 1 and not copied["complete"]
    assert big_uid in copied["failed"]["items"][0]["key"]

    dropping_link.cut_down = -1  # S3 is back
    resumed = _json(archive, "migrate", "--to", f"file://{target}")
    assert resumed["complete"] and resumed["copied"] == 1 and resumed["already_present"] == 1
    assert _json(archive, "verify")["ok"]


def test_a_c_get_whose_s3_read_breaks_mid_object_is_aborted_not_garbled(
        tmp_path: Path, dropping_link: LinkProxy, s3_bucket_url: str) -> None:
    """An object too large to read ahead is streamed from S3 into its
    C-STORE; the S3 connection reset half way through. The next message (the
    C-GET's pending response, the next C-STORE) went out inside the
    unfinished data set: DCMTK's getscu reported "Unexpected PDV type", and
    then, never seeing the final response, exited 0 with one object of
    three. Part of a message out, the association can only be aborted, as
    for a stored file ending early: the retriever knows it failed."""
    bucket = s3_bucket_url.split("://", 1)[1].split("?", 1)[0]
    through_link = f"s3://{bucket}?endpoint=127.0.0.1:{dropping_link.port}&secure=false"
    # Uploads send little downstream; every GET of a big object is cut.
    dropping_link.cut_down = 5_000_000
    server = PacsServer(tmp_path / "data", Backend("sqlite-s3", None, through_link, S3_ENV)).start()
    try:
        study, series = generate_uid(), generate_uid()
        for n in range(2):
            multiframe_rgb(tmp_path / f"{n}.dcm", 50, 256, 256)  # ~9.8 MB, over the read-ahead size
            ds = dcmread(tmp_path / f"{n}.dcm")
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, n + 1
            ds.save_as(tmp_path / f"{n}.dcm")
        sent = server.storescu(str(tmp_path / "0.dcm"), str(tmp_path / "1.dcm"))
        assert sent.returncode == 0, sent.stderr
        got = tmp_path / "got"
        got.mkdir()
        result = run_dcmtk("getscu", "-od", str(got), "-S", "-v", "-aec", server.ae_title, "-k",
                           "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1",
                           str(server.dicom_port), timeout=90)
        out = result.stdout + result.stderr
        assert "Unexpected PDV" not in out, out
        assert "Peer aborted Association" in out and result.returncode != 0, out
        assert list(got.iterdir()) == []
        assert dropping_link.cuts >= 1
        # The listener goes on serving.
        assert run_dcmtk("echoscu", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port)).returncode == 0
    finally:
        server.stop()


def test_a_resend_restores_an_indexed_objects_lost_s3_copy(tmp_path: Path, s3_bucket_url: str) -> None:
    """Keep-first on S3 answers a resend of an indexed instance from the
    index, without uploading it. When the object itself was gone (deleted
    by hand, a bucket restored from an older copy), the resend was
    acknowledged as a duplicate and the loss stayed: the modality's resend,
    the one way to heal it, now stores it again, as on the filesystem store."""
    archive = PacsServer(tmp_path / "data", Backend("sqlite-s3", None, s3_bucket_url, S3_ENV))
    ct = make_ct(tmp_path / "ct.dcm")
    archive.start()
    try:
        assert archive.storescu(str(ct)).returncode == 0
        core = archive.core()
        try:
            key = core.engine.connect().exec_driver_sql("SELECT storage_key FROM instances").scalar_one()
            core.store.delete(key)
            assert not core.store.exists(key)
            lost = _json(archive, "verify", rc=1)
            assert lost["missing"]["count"] == 1
            resent = archive.storescu(str(ct))
            assert resent.returncode == 0, resent.stderr
            assert core.store.exists(key)
            assert _json(archive, "verify")["ok"]
            # A resend of an object that is there is a duplicate, not uploaded again.
            assert archive.storescu(str(ct)).returncode == 0
        finally:
            core.close()
        assert "was missing from storage: stored again from this resend" in archive.log_text()
    finally:
        archive.stop()


def _keys(store: Any) -> set[str]:
    return {info.key for info in store.list()}


def test_the_file_store_lists_linked_folders_and_fails_on_unreadable_ones(tmp_path: Path) -> None:
    """`pacs reindex` and `pacs verify` list the store. A shard folder moved to
    a second disk and linked back was not walked, and one that could not be
    read (restored by root with its own permissions) was skipped without a
    word: a rebuilt index silently without those objects."""
    import shutil
    import tempfile

    from storage.filesystem import FileStore

    # Under /tmp itself: the listing runs as nobody below, who must reach the root.
    root = Path(tempfile.mkdtemp(prefix="pacs-list-"))
    try:
        root.chmod(0o755)
        store = FileStore(root / "objects")
        keys = {f"1.2.3/4.5.{n}/7.8.{n}.dcm" for n in range(2)}
        for key in keys:
            store.put(key, io.BytesIO(b"DICM" * 10), 40)
        shard = store.path_for(sorted(keys)[0]).parents[2]  # the first key's shard folder
        moved = root / "second-disk" / shard.name
        moved.parent.mkdir()
        shutil.move(shard, moved)
        shard.symlink_to(moved, target_is_directory=True)
        (moved / "loop").symlink_to(moved, target_is_directory=True)  # a link loop ends
        assert _keys(store) == keys

        for folder in (root, root / "objects", *store.root.rglob("*")):
            if folder.is_dir() and not folder.is_symlink():
                folder.chmod(0o755)
        (root / "second-disk").chmod(0o755)
        moved.chmod(0o700)  # root's: nobody cannot read it
        pid = os.fork()
        if pid == 0:  # the service user, not root (root reads every folder)
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                _keys(store)
                code = 0
            except StorageError as exc:
                code = 1 if "cannot list" in str(exc) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 1, "an unreadable folder is a StorageError, not skipped"
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
