"""IOD-breadth review fixes, against a real `pacs serve` with DCMTK
storescu / storescp / movescu / findscu and pynetdicom peers:

3. a storage SOP class listed in ``extra_storage_classes`` (a vendor's
   private class: Siemens CSA Non-Image 1.3.12.2.1107.5.9.1) is accepted
   over DIMSE, stored as received, indexed and sent back by C-MOVE and
   C-GET; without the setting it is refused (presentation context
   rejected), and a value that names no storage class stops the start;
4. QIDO-RS instances carry Bits Allocated (0028,0100) (PS3.18 Table
   10.6.3-5), and C-FIND at IMAGE level returns it when asked.
"""

from __future__ import annotations

import io
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, StudyRootQueryRetrieveInformationModelFind

from .conftest import PACS, Backend, PacsServer, dataset_bytes, free_port, pydicom_file, run_dcmtk
from .peers import c_get_study, dcmtk, wait_port

CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage
# A private class nobody listed.
UNLISTED = "1.2.826.0.1.3680043.8.498.4242.1"


@dataclass
class Archive:
    server: PacsServer
    tmp: Path
    movedest_port: int


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    tmp = tmp_path_factory.mktemp("iod-classes")
    data = tmp / "data"
    data.mkdir()
    # The config file of the data dir, as an operator writes it.
    (data / "pacs.toml").write_text(f'extra_storage_classes = ["{CSA_NON_IMAGE}"]\n')
    server = PacsServer(data, Backend("sqlite-fs", None, None, {}))
    movedest_port = free_port()
    server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(movedest_port))
    server.start()
    yield Archive(server, tmp, movedest_port)
    server.stop()


def _csa_object(path: Path, sop_class: str = CSA_NON_IMAGE) -> Dataset:
    """A CSA Non-Image object as a Siemens MR sends it: no pixels, private data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "CSA^TEST", f"CSA{uuid.uuid4().hex[:8]}"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 99, 1
    ds.add_new(0x00290010, "LO", "SIEMENS CSA NON-IMAGE")
    ds.add_new(0x7FE10010, "LO", "SIEMENS CSA NON-IMAGE")
    ds.add_new(0x7FE11010, "OB", os.urandom(2000))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def _storescu(archive: Archive, path: Path, sop_class: str) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu sending *path* on a context of *sop_class*, as a
    modality configured for it does: storescu itself refuses a class it does
    not know unless a configuration file (-xf) proposes it."""
    config = archive.tmp / f"storescu-{sop_class}.cfg"
    config.write_text("[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LittleEndianExplicit\n"
                      "TransferSyntax2 = LittleEndianImplicit\n\n[[PresentationContexts]]\n[Private]\n"
                      f"PresentationContext1 = {sop_class}\\Uncompressed\n\n"
                      "[[Profiles]]\n[Modality]\nPresentationContexts = Private\n")
    return archive.server.storescu("-xf", str(config), "Modality", str(path), calling="MRI_SIEMENS")


def _context_result(server: PacsServer, sop_class: str) -> int:
    """The A-ASSOCIATE-AC result for a context of *sop_class* (0 accepted,
    3 abstract syntax not supported), beside an MR context so the
    association itself is accepted."""
    ae = AE(ae_title="MRI_SIEMENS")
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        results = {str(cx.abstract_syntax): cx.result for cx in assoc.accepted_contexts + assoc.rejected_contexts}
    finally:
        assoc.release()
    return results[sop_class]


def _stored_bytes(server: PacsServer, sop_uid: str, sop_class: str) -> bytes:
    core = server.core()
    try:
        stored = core.reader.stored_instance(sop_uid)
        assert stored is not None and stored.sop_class_uid == sop_class, stored
        return dataset_bytes(core.store.read_bytes(stored.storage_key))
    finally:
        core.close()


def test_listed_private_class_stored_over_dimse(archive: Archive) -> None:
    """storescu of a CSA Non-Image object is stored as sent and found by QIDO-RS."""
    server = archive.server
    path = archive.tmp / "send" / "csa.dcm"
    ds = _csa_object(path)
    assert _context_result(server, CSA_NON_IMAGE) == 0
    result = _storescu(archive, path, CSA_NON_IMAGE)
    assert result.returncode == 0, result.stderr
    assert _stored_bytes(server, ds.SOPInstanceUID, CSA_NON_IMAGE) == dataset_bytes(path.read_bytes())
    with server.http() as client:
        found = client.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/instances")
    assert found.status_code == 200, found.text
    assert [i["00080016"]["Value"] for i in found.json()] == [[CSA_NON_IMAGE]]


def test_unlisted_private_class_refused(archive: Archive) -> None:
    """A private class that is not listed is still refused over DIMSE:
    its context rejected, storescu fails and nothing is stored."""
    server = archive.server
    assert _context_result(server, UNLISTED) == 3
    path = archive.tmp / "send" / "unlisted.dcm"
    ds = _csa_object(path, UNLISTED)
    result = _storescu(archive, path, UNLISTED)
    assert result.returncode != 0
    assert "no presentation context" in result.stderr.lower() or "no acceptable" in result.stderr.lower(), \
        result.stderr
    core = server.core()
    try:
        assert core.reader.stored_instance(ds.SOPInstanceUID) is None
    finally:
        core.close()


def test_private_class_refused_without_the_setting(tmp_path: Path) -> None:
    """The same server without extra_storage_classes refuses the CSA class."""
    server = PacsServer(tmp_path / "plain", Backend("sqlite-fs", None, None, {}))
    server.start()
    try:
        assert _context_result(server, CSA_NON_IMAGE) == 3
    finally:
        server.stop()


def test_listed_private_class_retrieved(archive: Archive) -> None:
    """C-MOVE proposes the stored class to DCMTK storescp (-pm: it takes
    unknown classes) and C-GET sends it back on the requester's context:
    both get the object byte for byte."""
    server = archive.server
    path = archive.tmp / "send" / "csa-retrieve.dcm"
    ds = _csa_object(path)
    result = _storescu(archive, path, CSA_NON_IMAGE)
    assert result.returncode == 0, result.stderr
    kept = _stored_bytes(server, ds.SOPInstanceUID, CSA_NON_IMAGE)

    out = archive.tmp / "moved"
    out.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-pm", "+B", "-od", str(out), "-aet", "MOVEDEST",
                            str(archive.movedest_port)],
                           env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_port(archive.movedest_port, proc=scp)
        moved = run_dcmtk("movescu", "-v", "-S", "-aem", "MOVEDEST", "-aec", server.ae_title,
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
                          "127.0.0.1", str(server.dicom_port))
    finally:
        scp.terminate()
        scp.wait(timeout=30)
    assert moved.returncode == 0, moved.stderr
    files = list(out.iterdir())
    assert len(files) == 1, moved.stderr
    assert dcmread(files[0]).SOPClassUID == CSA_NON_IMAGE
    assert dataset_bytes(files[0].read_bytes()) == kept

    statuses, received = c_get_study(server, ds.StudyInstanceUID, CSA_NON_IMAGE)
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert received == [kept]


@pytest.mark.parametrize("value, says", [
    ("1.2.03", "is not a UID"),
    ("1.2.840.10008.1.2.4.50", "is a transfer syntax"),
    ("1.2.840.10008.5.1.4.1.2.2.1", "is Study Root Query/Retrieve Information Model - FIND"),
])
def test_bad_extra_storage_class_stops_start(tmp_path: Path, value: str, says: str) -> None:
    """A value that is no storage SOP class UID stops `pacs serve` before it
    listens, naming the setting and the value."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}
    env.update(PACS_ENV_FILE="", PACS_EXTRA_STORAGE_CLASSES=f"{CSA_NON_IMAGE}, {value}")
    result = subprocess.run([PACS, "serve", "--data-dir", str(tmp_path / "data"), "--dicom-port", str(free_port()),
                             "--http-port", str(free_port()), "--hl7-port", str(free_port())],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"extra_storage_classes: '{value}' {says}" in result.stderr, result.stderr
    assert not (tmp_path / "data" / "index.sqlite").exists()  # refused before an archive was made


# -- Bits Allocated ----------------------------------------------------------------
@pytest.fixture(scope="module")
def segmentation(archive: Archive) -> Dataset:
    """pydicom's liver.dcm (SEG, Bits Allocated 1, 3 frames), stored by STOW-RS."""
    ds = dcmread(pydicom_file("liver.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    body = io.BytesIO()
    ds.save_as(body, enforce_file_format=True)
    boundary = uuid.uuid4().hex
    payload = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + body.getvalue()
               + f"\r\n--{boundary}--\r\n".encode())
    with archive.server.http() as client:
        stored = client.post("/dicom-web/studies", content=payload, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert stored.status_code == 200, stored.text
    return ds


@pytest.mark.parametrize("params", [{}, {"includefield": "00280100"}, {"includefield": "BitsAllocated"},
                                    {"includefield": "all"}])
def test_qido_instances_carry_bits_allocated(archive: Archive, segmentation: Dataset,
                                             params: dict[str, str]) -> None:
    """Bits Allocated is a required instance-level return attribute (PS3.18
    Table 10.6.3-5), beside Rows, Columns and Number of Frames."""
    ds = segmentation
    with archive.server.http() as client:
        found = client.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances",
                           params=params)
    assert found.status_code == 200, found.text
    [instance] = found.json()
    assert instance["00280100"] == {"vr": "US", "Value": [1]}
    assert instance["00280010"]["Value"] == [ds.Rows] and instance["00280008"]["Value"] == [3]


def test_qido_matches_bits_allocated(archive: Archive, segmentation: Dataset) -> None:
    """Bits Allocated is a matching key too (single value)."""
    with archive.server.http() as client:
        url = f"/dicom-web/studies/{segmentation.StudyInstanceUID}/instances"
        assert len(client.get(url, params={"BitsAllocated": "1"}).json()) == 1
        assert client.get(url, params={"BitsAllocated": "16"}).status_code == 200
        assert client.get(url, params={"BitsAllocated": "16"}).json() == []


def test_c_find_image_level_returns_bits_allocated(archive: Archive, segmentation: Dataset) -> None:
    """DCMTK findscu asking for Bits Allocated at IMAGE level gets it; a
    pynetdicom C-FIND that does not ask does not (C-FIND returns the keys
    asked, PS3.4 C.4.1.1.3.2)."""
    ds = segmentation
    out = archive.server.data_dir.parent / "find"
    out.mkdir(exist_ok=True)
    result = run_dcmtk("findscu", "-S", "-aec", archive.server.ae_title, "-X", "-od", str(out),
                       "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
                       "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}", "-k", "SOPInstanceUID",
                       "-k", "BitsAllocated", "-k", "Rows",
                       "127.0.0.1", str(archive.server.dicom_port))
    assert result.returncode == 0, result.stderr
    [answer] = [dcmread(f, force=True) for f in out.iterdir()]
    assert answer.SOPInstanceUID == ds.SOPInstanceUID
    assert answer.BitsAllocated == 1 and answer.Rows == ds.Rows

    ae = AE(ae_title="FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", archive.server.dicom_port, ae_title=archive.server.ae_title)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID, query.SeriesInstanceUID = ds.StudyInstanceUID, ds.SeriesInstanceUID
    query.SOPInstanceUID = ""
    answers = [identifier for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
               if status.Status in (0xFF00, 0xFF01)]
    assoc.release()
    assert len(answers) == 1 and "BitsAllocated" not in answers[0]
