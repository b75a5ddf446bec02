"""The operator's CLI as a reviewer used it: the service's settings file,
a data dir served with another archive, import of real-world media (CD
copies with DICOMDIR, files without preamble, unreadable files, conflicting
UIDs), backups to an unmounted share, a mistyped bucket, typos in keys."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from pathlib import Path

from minio import Minio
from pydicom import dcmread
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from .conftest import PACS, S3_ACCESS, S3_SECRET, Backend, PacsServer, free_port, pydicom_file
from .dicomfiles import encode_dataset
from .peers import PACS_COMMANDS, S3Server


def _env(**extra: str) -> dict[str, str]:
    # No service settings file of this machine leaks into a test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}
    env.update({"PACS_ENV_FILE": "", "PACS_OFFER_SAMPLES": "false"}, **extra)
    return env


def pacs(*args: str, data_dir: Path, env: dict[str, str] | None = None,
         prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    if not prefix:  # forked from the tests' zygote (pacs imported once): the same command, a second sooner
        return PACS_COMMANDS.run([*args, "--data-dir", str(data_dir)], env or _env(), timeout=300)
    return subprocess.run([*prefix, PACS, *args, "--data-dir", str(data_dir)], capture_output=True, text=True,
                          timeout=300, env=env or _env())


def _json(result: subprocess.CompletedProcess[str]) -> dict:  # type: ignore[type-arg]
    return json.loads(result.stdout)


# -- 1. the service's settings --------------------------------------------------------
def test_commands_read_the_service_settings_and_refuse_another_archive(tmp_path: Path, pg_url: str) -> None:
    """The service reads /etc/filmless-pacs.env (systemd EnvironmentFile): a
    command run beside it reads it too (PACS_ENV_FILE names it here), so
    `pacs import` fills the server's PostgreSQL index. Without it, the data
    dir's record of the server's archive refuses the command instead of
    creating a second, SQLite index nobody serves."""
    data = tmp_path / "data"
    data.mkdir()
    env_file = tmp_path / "filmless-pacs.env"
    env_file.write_text(f"# the service's settings\nPACS_INDEX_URL={pg_url}\nPACS_TIMEZONE=\"Asia/Ho_Chi_Minh\"\n")
    server = PacsServer(data, Backend("pg", pg_url, None, {})).start()
    try:
        record = (data / "archive.json").read_text()
        assert "127.0.0.1" in record and "password" not in record
        src = tmp_path / "in"
        src.mkdir()
        (src / "ct.dcm").write_bytes(pydicom_file("CT_small.dcm").read_bytes())
        with_file = _env(PACS_ENV_FILE=str(env_file))
        imported = pacs("import", str(src), "--json", data_dir=data, env=with_file)
        assert imported.returncode == 0, imported.stderr
        assert _json(imported)["stored"] == 1
        assert pacs("ae", "add", "CT_ROOM1", "--host", "10.0.0.21", "--port", "104", data_dir=data,
                    env=with_file).returncode == 0
        assert server.stats()["instances"] == 1
        assert [ae["title"] for ae in _json(server.cli("ae", "list", "--json")) if ae["title"] == "CT_ROOM1"]
        # A variable already set wins over the file: here, one naming another database.
        other = pacs("stats", "--json", data_dir=data,
                     env={**with_file, "PACS_INDEX_URL": pg_url.rsplit("/", 1)[0] + "/postgres"})
        assert other.returncode == 1 and "--index-url" in other.stderr

        for command in (["import", str(src)], ["ae", "add", "X", "--host", "h", "--port", "104"], ["stats"]):
            refused = pacs(*command, data_dir=data)
            assert refused.returncode == 1, (command, refused.stdout)
            said = refused.stderr.replace("\n", "")
            assert "refused" in said and f"--index-url postgresql://postgres@127.0.0.1:5432/{pg_url.rsplit('/', 1)[1]}" in said
        assert not (data / "index.sqlite").exists()
        missing = pacs("stats", data_dir=data, env=_env(PACS_ENV_FILE=str(tmp_path / "nope.env")))
        assert missing.returncode == 1 and "PACS_ENV_FILE" in missing.stderr
    finally:
        server.stop()


# -- 2, 3, 6. import --------------------------------------------------------------------
def test_import_of_a_uid_kept_in_another_study_fails(tmp_path: Path) -> None:
    """An object whose SOP Instance UID is stored in another study is not
    stored (0111H over DICOM): import counts it failed, not "already stored"."""
    first = tmp_path / "a.dcm"
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.save_as(first)
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "OTHER", generate_uid(), generate_uid()
    conflicting = tmp_path / "b.dcm"
    ds.save_as(conflicting)
    assert pacs("import", str(first), data_dir=tmp_path / "data").returncode == 0
    result = pacs("import", str(conflicting), "--json", data_dir=tmp_path / "data")
    assert result.returncode == 1
    summary = _json(result)
    assert (summary["failed"], summary["duplicates"], summary["stored"]) == (1, 0, 0)
    assert "already stored in study" in summary["errors"][0]["error"]


def test_unreadable_files_and_folders_fail(tmp_path: Path) -> None:
    """A file or folder that cannot be read (a scratched CD; permissions
    here, without root's override) is a failure, not "not DICOM" or nothing."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for name in ("a.dcm", "b.dcm", "sub/c.dcm"):
        (src / name).write_bytes(pydicom_file("CT_small.dcm").read_bytes())
    os.chmod(src / "b.dcm", 0)
    os.chmod(src / "sub", 0)
    try:
        result = pacs("import", str(src), "--json", data_dir=tmp_path / "data",
                      prefix=("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"))
    finally:
        os.chmod(src / "sub", 0o755)
        os.chmod(src / "b.dcm", 0o644)
    assert result.returncode == 1, result.stderr
    summary = _json(result)
    assert (summary["stored"], summary["not_dicom"], summary["failed"]) == (1, 0, 2)
    assert {e["path"]: e["error"].startswith("cannot read") for e in summary["errors"]} == {
        str(src / "b.dcm"): True, str(src / "sub"): True}


def test_import_of_a_cd_copy_skips_dicomdir_and_reads_files_without_preamble(tmp_path: Path) -> None:
    """A CD copy: its DICOMDIR (PS3.10 8) is skipped, not failed; a data set
    written without preamble and "DICM" (which storescu sends) is stored as
    a Part 10 object with File Meta built for it."""
    cd = tmp_path / "cd"
    fileset = FileSet()
    fileset.add(dcmread(pydicom_file("CT_small.dcm")))
    fileset.write(cd)
    bare = dcmread(pydicom_file("MR_small.dcm"))
    del bare.file_meta
    (cd / "IM000001").write_bytes(encode_dataset(bare, implicit_vr=True))
    result = pacs("import", str(cd), "--json", data_dir=tmp_path / "data")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = _json(result)
    assert (summary["stored"], summary["skipped"], summary["not_dicom"], summary["failed"]) == (2, 1, 0, 0)
    [stored] = (tmp_path / "data" / "objects").rglob(f"{bare.SOPInstanceUID}*.dcm")
    back = dcmread(stored)  # a Part 10 file: no force needed
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert back.file_meta.MediaStorageSOPInstanceUID == bare.SOPInstanceUID
    assert back.PatientName == bare.PatientName and back.PixelData == bare.PixelData


# -- 4. backup ------------------------------------------------------------------------
def test_backup_to_a_folder_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    """A NAS share not mounted: the backup is not written to the local disk."""
    data = tmp_path / "data"
    assert pacs("db", "upgrade", data_dir=data).returncode == 0
    (tmp_path / "mnt").mkdir()
    result = pacs("backup", "--out", str(tmp_path / "mnt" / "nas" / "pacs" / "x.bak"), data_dir=data)
    assert result.returncode == 1
    assert str(tmp_path / "mnt" / "nas" / "pacs") in result.stderr.replace("\n", "")
    assert list((tmp_path / "mnt").iterdir()) == []


# -- 5. S3 buckets --------------------------------------------------------------------
def test_a_mistyped_bucket_is_not_created(tmp_path: Path, s3_server: S3Server) -> None:
    """Only commands that store objects create their bucket: `pacs reindex`
    (or `pacs stats`) from a mistyped one is refused, naming it."""
    env = _env(PACS_S3_ACCESS_KEY=S3_ACCESS, PACS_S3_SECRET_KEY=S3_SECRET)
    bucket, typo = f"archive-{uuid.uuid4().hex[:8]}", f"archiv-{uuid.uuid4().hex[:8]}"
    src = tmp_path / "in"
    src.mkdir()
    (src / "ct.dcm").write_bytes(pydicom_file("CT_small.dcm").read_bytes())
    imported = pacs("import", str(src), "--storage-url", s3_server.url(bucket), data_dir=tmp_path / "d", env=env)
    assert imported.returncode == 0, imported.stderr
    # reindex: a new server whose index disk died; stats: the importing node's index.
    for command, data in ((["reindex"], tmp_path / "d2"), (["stats"], tmp_path / "d")):
        result = pacs(*command, "--storage-url", s3_server.url(typo), data_dir=data, env=env)
        assert result.returncode == 1, (command, result.stdout)
        assert f"no bucket {typo}" in result.stderr
    client = Minio(s3_server.endpoint, access_key=S3_ACCESS, secret_key=S3_SECRET, secure=False,
                   region="us-east-1")
    names = {b.name for b in client.list_buckets()}
    assert bucket in names and typo not in names


# -- lower harm -------------------------------------------------------------------------
def test_typos_and_config_file_entries_are_refused(tmp_path: Path) -> None:
    """An unknown C-FIND key is refused (it was dropped: every study listed);
    retrying a job that does not exist, and removing an AE or rule the
    config file defines (it came back at the next start), exit 1."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "pacs.toml").write_text('[[ae]]\ntitle = "CT_ROOM1"\nhost = "10.0.0.21"\nport = 104\n'
                                    '[[route]]\nname = "to-backup"\nif = ["Modality=CT"]\nto_ae = "CT_ROOM1"\n')
    assert pacs("ae", "add", "REMOTE", "--host", "127.0.0.1", "--port", str(free_port()),
                data_dir=data).returncode == 0
    typo = pacs("remote", "find", "REMOTE", "-k", "PatientNam=NOBODY", data_dir=data)
    assert typo.returncode == 1 and "PatientNam" in typo.stderr and "PatientName" in typo.stderr
    retry = pacs("route", "retry", "--job", "999", data_dir=data)
    assert retry.returncode == 1 and "999" in retry.stderr
    removed = pacs("ae", "remove", "CT_ROOM1", data_dir=data)
    assert removed.returncode == 1 and "config file" in removed.stderr
    assert pacs("route", "remove", "to-backup", data_dir=data).returncode == 1
    assert "to-backup" in pacs("route", "rules", "--json", data_dir=data).stdout


def _adt_a04(port: int, patient_id: str) -> str:
    message = "\r".join([
        f"MSH|^~\\&|HIS|BV|PACS|BV|20261205120000||ADT^A04^ADT_A01|{uuid.uuid4().hex[:20]}|P|2.5",
        "EVN|A04|20261205120000",
        f"PID|1||{patient_id}^^^BV^MR||NGUYEN^VAN A||19800101|M",
        "PV1|1|O",
    ]) + "\r"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"\x0b" + message.encode() + b"\x1c\r")
        reply = b""
        while not reply.endswith(b"\x1c\r"):
            chunk = conn.recv(4096)
            assert chunk, reply
            reply += chunk
    return reply.decode()


def test_stats_counts_patients_with_images(tmp_path: Path) -> None:
    """Patients the HIS registered (ADT) without any study are not counted
    beside the image counts."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {})).start()
    try:
        assert server.storescu(str(pydicom_file("CT_small.dcm"))).returncode == 0
        for patient_id in ("HISONLY001", "HISONLY002"):
            assert "MSA|AA" in _adt_a04(server.hl7_port, patient_id)
        stats = _json(server.cli("stats", "--json"))
        assert (stats["patients"], stats["studies"], stats["instances"]) == (1, 1, 1)
    finally:
        server.stop()


# -- root on the service's data dir ---------------------------------------------------
def test_root_is_refused_on_a_data_dir_of_the_service_user(tmp_path: Path) -> None:
    """`sudo pacs import ...` left root-owned objects, shard folders and
    SQLite -wal/-shm files the service could not read: root is refused on a
    data dir another user owns, and writes nothing there (these tests run as
    root, as the install does)."""
    assert os.geteuid() == 0, "this test checks what root may do"
    data = tmp_path / "data"
    assert pacs("ae", "add", "CT1", "--host", "127.0.0.1", "--port", "104", data_dir=data).returncode == 0
    service = 65534  # nobody: the service user here
    for path in [data, *data.rglob("*")]:
        os.chown(path, service, service)
    before = sorted(str(p) for p in data.rglob("*"))
    src = tmp_path / "cd"
    src.mkdir()
    (src / "a.dcm").write_bytes(pydicom_file("CT_small.dcm").read_bytes())
    for command in (("stats", "--json"), ("import", str(src))):
        result = pacs(*command, data_dir=data)
        assert result.returncode == 1 and "sudo -u nobody" in result.stderr, (command, result.stderr)
    assert sorted(str(p) for p in data.rglob("*")) == before
    assert all(p.stat().st_uid == service for p in [data, *data.rglob("*")])
    # A data dir root owns (a root-run install, these tests) is root's to use.
    for path in [data, *data.rglob("*")]:
        os.chown(path, 0, 0)
    assert pacs("stats", "--json", data_dir=data).returncode == 0


def test_a_route_password_typed_with_a_slash_is_never_shown(tmp_path: Path) -> None:
    """`pacs route add --to-url https://pacs:Pw9/Zq#Kx@host/dw` (a password not
    percent-encoded) wrote "Zq#Kx@host" and the rest into its audit event and
    `pacs route rules` showed part of it: urlsplit ends the authority at the
    "/". Everything up to the last "@" goes now, as in /metrics."""
    data = tmp_path / "data"
    data.mkdir()
    url = "https://pacs:Pw9/Zq#Kx@cloud.example/dw"
    assert pacs("route", "add", "to-cloud", "--if", "Modality=CT", "--to-url", url, data_dir=data).returncode == 0
    shown = pacs("route", "rules", data_dir=data).stdout + pacs("route", "rules", "--json", data_dir=data).stdout
    trail = pacs("audit", "--format", "json", data_dir=data).stdout
    assert "cloud.example" in trail and "to-cloud" in shown
    for secret in ("Pw9", "Zq#Kx"):
        assert secret not in trail, trail
