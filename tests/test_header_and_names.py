"""The header parser (completeness checks) and name folding."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pacs.errors import IngestError
from pacs.header import parse_header
from pacs.names import fold, fold_name, same_person

from .conftest import pydicom_file


@pytest.mark.parametrize(
    ("raw", "folded"),
    [
        ("Nguyễn^Văn An", "NGUYEN^VAN AN"),
        ("nguyễn văn an", "NGUYEN VAN AN"),
        ("Đặng^Quốc Bảo", "DANG^QUOC BAO"),
        ("Trần^Thị Bích Ngọc", "TRAN^THI BICH NGOC"),
        ("Lê^Đức Thắng^^^", "LE^DUC THANG"),
        ("Müller^Jürgen", "MULLER^JURGEN"),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "YAMADA^TAROU=山田^太郎=やまだ^たろう"),
        ("", ""),
    ],
)
def test_fold_name(raw: str, folded: str) -> None:
    assert fold_name(raw) == folded


def test_same_person_keeps_diacritics_and_ignores_form() -> None:
    """Access to referred studies: the same name, diacritics included (the
    folded form, for searching, confuses Tuân and Tuấn)."""
    assert same_person("Hoàng^Minh Tuấn", "HOÀNG^MINH TUẤN^^")
    assert same_person("Nguyễn^Văn An=グエン^ヴァン", "Nguyễn^Văn  An")  # the alphabetic group decides
    assert same_person("Nguye\u0302\u0303n^Văn An", "Nguyễn^Văn An")  # NFD and NFC
    assert not same_person("Hoàng^Minh Tuân", "Hoàng^Minh Tuấn")
    assert not same_person("Hoang^Minh Tuan", "Hoàng^Minh Tuấn")
    assert not same_person("", "") and not same_person(None, "")


def test_fold_is_idempotent() -> None:
    assert fold(fold("Nguyễn  Văn   An")) == "NGUYEN VAN AN"


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "emri_small_RLE.dcm",
     "SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm", "waveform_ecg.dcm"],
)
def test_every_truncation_point_is_refused(name: str) -> None:
    data = pydicom_file(name).read_bytes()
    header = parse_header(io.BytesIO(data), len(data))
    assert header.sop_uid
    # Cut the object at many points from the pixel data on: each must fail.
    start = header.pixel_offset or len(data) // 2
    step = max(1, (len(data) - start) // 40)
    for cut in range(start + 1, len(data), step):
        with pytest.raises(IngestError) as exc:
            parse_header(io.BytesIO(data[:cut]), cut)
        assert exc.value.status in (0xC000, 0xA900)


def test_deflated_object_parses() -> None:
    data = pydicom_file("image_dfl.dcm").read_bytes()
    header = parse_header(io.BytesIO(data), len(data))
    assert header.transfer_syntax_uid == "1.2.840.10008.1.2.1.99"
    assert header.pixel_offset is None


def test_not_dicom() -> None:
    with pytest.raises(IngestError) as exc:
        parse_header(io.BytesIO(b"hello world" * 100), 1100)
    assert exc.value.status == 0xC000


# -- the in-memory scan (received datasets) against pydicom's reader ----------------------
def _received(data: bytes) -> tuple[bytes, bytes]:
    """(file meta prefix, dataset) of a Part 10 file, as DIMSE delivers it."""
    end = 132 + 12 + int.from_bytes(data[140:144], "little")
    return data[:end], data[end:]


def _both_ways(data: bytes, syntax: str) -> tuple[object, object]:
    """parse_header over a received buffer (scanned) and over a plain stream
    (pydicom's reader): each the header or the IngestError status."""
    from pacs.part10 import Part10Stream

    prefix, body = _received(data)
    outcomes = []
    for stream in (Part10Stream(prefix, bytearray(body)), io.BytesIO(data)):
        try:
            outcomes.append(parse_header(stream, len(data), transfer_syntax=syntax))
        except IngestError as exc:
            outcomes.append(exc.status)
    return outcomes[0], outcomes[1]


def _little_endian_corpus(tmp: Path) -> list[Path]:
    from pydicom import dcmread
    from pydicom.data.data_manager import DATA_ROOT
    from pydicom.uid import UID

    from sample_studies.generate import generate_all

    from .qr_corpus import write_corpus

    # pydicom's own test files and pydicom-data's, found on disk (no download).
    files = sorted((Path(DATA_ROOT) / "test_files").rglob("*.dcm"))
    files += sorted(pydicom_file("693_J2KR.dcm").parent.rglob("*.dcm"))
    files += write_corpus(tmp / "qr")
    generate_all(tmp / "samples", quick=True)
    files += sorted((tmp / "samples").rglob("*.dcm"))
    chosen = []
    for path in files:
        try:
            syntax = UID(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        except Exception:
            continue
        if syntax.is_transfer_syntax and syntax.is_little_endian and not syntax.is_deflated:
            chosen.append(path)
    return chosen


def test_scan_reads_what_pydicom_reads(tmp_path: Path) -> None:
    """Every little-endian file at hand (pydicom's test files, the Q/R corpus
    with other patient IDs, the Vietnamese sample studies): the scan gives
    the very header pydicom's reader gives, or falls back to it."""
    from pydicom import dcmread

    corpus = _little_endian_corpus(tmp_path)
    assert len(corpus) > 100
    scanned = 0
    for path in corpus:
        data = path.read_bytes()
        syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        fast, slow = _both_ways(data, syntax)
        assert fast == slow, path.name
        if not isinstance(fast, int):
            assert fast.pixel_offset == slow.pixel_offset, path.name
            assert fast.full_dataset() is not None
            scanned += 1
    assert scanned > 100


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "emri_small_RLE.dcm"])
def test_scanned_truncations_are_refused(name: str) -> None:
    from pydicom import dcmread

    data = pydicom_file(name).read_bytes()
    syntax = str(dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)
    prefix, _ = _received(data)
    step = max(1, (len(data) - len(prefix)) // 60)
    for cut in range(len(prefix) + 1, len(data), step):
        fast, slow = _both_ways(data[:cut], syntax)
        assert isinstance(fast, int) and fast == slow, cut


def test_every_character_set_of_pydicoms_examples_is_decoded_as_pydicom_decodes_it() -> None:
    """PS3.5 Annex H-K examples, ISO 2022 escapes included: the indexed name is
    pydicom's decoding, never text with escape sequences left in (a Korean
    name under "\\ISO 2022 IR 149" kept ESC $ ) C before each part)."""
    from pydicom import dcmread
    from pydicom.data import get_charset_files

    checked = []
    for path in map(Path, get_charset_files("chr*.dcm")):
        data = path.read_bytes()
        try:
            header = parse_header(io.BytesIO(data), len(data))
        except IngestError:
            continue  # a few examples have no Pixel Data: refused, not misread
        expected = str(dcmread(path, stop_before_pixels=True).PatientName)
        # (pydicom's str() drops an empty last component group: "...=王^小东=")
        assert header.patient_name.rstrip("=") == expected, path.name
        assert "\x1b" not in header.patient_name + header.patient_name_folded, path.name
        # Received over DIMSE, the header is scanned from memory: the same answer.
        syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        fast, slow = _both_ways(data, syntax)
        assert fast == slow == header, path.name
        checked.append(path.name)
    assert "chrI2.dcm" in checked and len(checked) >= 10, checked
