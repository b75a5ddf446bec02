"""The report's letterhead (report_header_left, report_header_right,
report_logo): a `pacs serve` configured as a Vietnamese provincial hospital
signs reports over the HTTP API; the PDF stored in the study carries the
health department, hospital and department at the left, the national motto
at the right and the logo, and the signature block dated at report_place;
a logo file gone since the start leaves the report signable, without it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .pdftext import page_texts

LEFT = ["SỞ Y TẾ TỈNH NAM ĐỊNH", "BỆNH VIỆN ĐA KHOA TỈNH NAM ĐỊNH", "KHOA CHẨN ĐOÁN HÌNH ẢNH"]
RIGHT = ["CỘNG HÒA XÃ HỘI CHỦ NGHĨA VIỆT NAM", "Độc lập - Tự do - Hạnh phúc"]


@pytest.fixture
def hospital(tmp_path: Path) -> Iterator[PacsServer]:
    logo = tmp_path / "logo.png"
    Image.new("RGB", (120, 90), (180, 20, 20)).save(logo)
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}), extra_env={
        "PACS_REPORT_HEADER_LEFT": " | ".join(LEFT), "PACS_REPORT_HEADER_RIGHT": "|".join(RIGHT),
        "PACS_REPORT_LOGO": str(logo), "PACS_REPORT_PLACE": "Nam Định"})
    server.start()
    server.logo = logo  # type: ignore[attr-defined]
    yield server
    server.stop()


def _signed_pdf(server: PacsServer, token: str, folder: Path) -> bytes:
    folder.mkdir()
    study = generate_uid()
    ct = make_ct(folder / "ct.dcm", StudyInstanceUID=study, PatientID="001085012345", PatientName="Nguyễn^Văn An",
                 SpecificCharacterSet="ISO_IR 192", InstitutionName="BVDK NAM DINH")
    assert server.storescu(str(ct)).returncode == 0
    with server.http(token) as rad:
        url = f"/api/studies/{study}/report"
        assert rad.put(url, json={"findings": "Nhu mô não bình thường.", "impression": "Không thấy bất thường."}
                       ).status_code == 200
        signed = rad.post(f"{url}/sign")
        assert signed.status_code == 200, signed.text
        pdf = rad.get(f"{url}/pdf")
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    return pdf.content


def test_the_report_carries_the_hospitals_letterhead(hospital: PacsServer, tmp_path: Path) -> None:
    token = hospital.make_token("bs.tung", "radiologist", "Đỗ^Thanh Tùng")
    pdf = _signed_pdf(hospital, token, tmp_path / "one")
    lines = page_texts(pdf)[0].splitlines()
    assert lines[:6] == [*LEFT, *RIGHT, "KẾT QUẢ CHẨN ĐOÁN HÌNH ẢNH / IMAGING REPORT"], lines[:8]
    assert "BVDK NAM DINH" not in lines  # the hospital is named by the letterhead
    assert b"/Subtype /Image" in pdf
    # The signature block, dated as the signature line below it is (the hospital's day).
    at = lines.index("BÁC SĨ ĐỌC KẾT QUẢ / RADIOLOGIST")
    signed = next(line for line in lines if line.startswith("Ký / Signed: Đỗ Thanh Tùng — "))
    year, month, day = signed.split(" — ")[1][:10].split("-")
    assert lines[at - 1:at + 2] == [f"Nam Định, ngày {day} tháng {month} năm {year}",
                                    "BÁC SĨ ĐỌC KẾT QUẢ / RADIOLOGIST", "Đỗ Thanh Tùng"], lines
    # The logo file moved away: the next report is signed all the same, without it.
    hospital.logo.unlink()  # type: ignore[attr-defined]
    since = hospital.log_path.stat().st_size
    pdf = _signed_pdf(hospital, token, tmp_path / "two")
    assert page_texts(pdf)[0].splitlines()[:5] == [*LEFT, *RIGHT]
    assert b"/Subtype /Image" not in pdf
    assert "report_logo" in hospital.log_text(since) and "left out of the report" in hospital.log_text(since)


def test_without_a_letterhead_the_institution_heads_the_report() -> None:
    from pacs.report_pdf import Letterhead, ReportContent, render
    from pacs.settings import Settings

    settings = Settings(report_header_left=[], report_header_right=[], report_logo=None)
    assert not Letterhead.from_settings(settings)
    pdf = render(ReportContent(
        institution="BV Đa khoa", patient_name="Nguyễn^Văn An", patient_id="001085012345", birth_date="19850101",
        sex="M", study_date="20240115", accession="ACC002", description="CT", modalities="CT",
        findings="Bình thường.", impression="Không.", signed_by="Đỗ^Thanh Tùng", signed_at="2024-01-15 10:00",
        version=1, viewer_url="", letterhead=Letterhead.from_settings(settings)))
    lines = page_texts(pdf)[0].splitlines()
    assert lines[:2] == ["BV Đa khoa", "KẾT QUẢ CHẨN ĐOÁN HÌNH ẢNH / IMAGING REPORT"]
    assert "Ngày 15 tháng 01 năm 2024" in lines  # no report_place: the date alone
