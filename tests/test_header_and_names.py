"""The header parser (completeness checks) and name folding."""

from __future__ import annotations

import io

import pytest

from pacs.errors import IngestError
from pacs.header import parse_header
from pacs.names import fold, fold_name

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
