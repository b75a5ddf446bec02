"""A signed report as a PDF (UTF-8 text, Vietnamese included), with fpdf2.

fpdf2's core fonts are Latin-1 only; a TrueType font with Vietnamese
glyphs is required: DejaVu Sans from Debian's fonts-dejavu-core (installed
by the set-up scripts and the Docker image), or PACS_REPORT_FONT.
"""

from __future__ import annotations

import io
import logging
import os
import unicodedata
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_FONT_CANDIDATES = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
]


@dataclass(frozen=True)
class Letterhead:
    """The top of a report's first page (settings ``report_header_left``,
    ``report_header_right``, ``report_logo``): text lines at the left and
    the right, and a logo image before the left ones."""

    left: tuple[str, ...] = ()
    right: tuple[str, ...] = ()
    logo: bytes | None = None

    def __bool__(self) -> bool:
        return bool(self.left or self.right or self.logo)

    @classmethod
    def from_settings(cls, settings: Any) -> Letterhead:
        """The letterhead the settings describe. A logo that cannot be read
        as an image is left out with a warning: a report must still be
        signable when the file was moved."""
        return cls(tuple(settings.report_header_left), tuple(settings.report_header_right),
                   _logo(settings.report_logo))


# The logo's height on the page, and the widest it may be, mm.
_LOGO_HEIGHT, _LOGO_MAX_WIDTH = 18.0, 36.0


def _logo(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        from PIL import Image

        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        return data
    except Exception as exc:  # a missing file, not an image
        log.warning("report_logo %s left out of the report: %s", path, exc)
        return None


@dataclass
class ReportContent:
    institution: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_date: str
    accession: str
    description: str
    modalities: str
    findings: str
    impression: str
    signed_by: str
    signed_at: str
    version: int
    viewer_url: str
    # Key images (JPEG, pacs.key_images), printed under the text.
    key_images: tuple[bytes, ...] = ()
    letterhead: Letterhead = Letterhead()
    # Where the report is signed, before its date ("Nam Định, ngày ..."): report_place.
    place: str = ""
    # A critical result (pacs.critical_results): its note ("" none given); None: not critical.
    critical: str | None = None


def font_path() -> str:
    configured = os.environ.get("PACS_REPORT_FONT")
    for candidate in ([configured] if configured else []) + _FONT_CANDIDATES:
        if candidate and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError("no Unicode TrueType font: apt-get install fonts-dejavu-core or set PACS_REPORT_FONT")


def _date(value: str) -> str:
    return f"{value[6:8]}/{value[4:6]}/{value[0:4]}" if len(value) == 8 and value.isdigit() else value


# A tab stop as the PDF shows it: fpdf2 has no tab, and the font no glyph
# for one (the character was dropped, "Tổn thươngkích").
_TAB = "    "


def _text(value: str) -> str:
    return value.replace("\t", _TAB)


def _report_pdf(content: ReportContent) -> Any:
    """An FPDF whose every page after the first names the patient (a loose
    page of a printed report must say whose it is), and whose every page is
    numbered "Trang n/N" (none goes missing unnoticed)."""
    from fpdf import FPDF

    patient = " — ".join(v for v in (content.patient_name.replace("^", " "),
                                     f"Mã BN / ID {content.patient_id}" if content.patient_id else "",
                                     f"Số phiếu / Acc. {content.accession}" if content.accession else "") if v)

    class _ReportPDF(FPDF):  # type: ignore[misc]
        def header(self) -> None:
            if self.page_no() == 1:
                return  # the first page has the full patient block
            self.set_font("body", size=8)
            self.cell(0, 5, patient, new_x="LMARGIN", new_y="NEXT")
            self.ln(2)

        def footer(self) -> None:
            self.set_y(-12)
            self.set_font("body", size=8)
            self.cell(0, 5, f"Trang / Page {self.page_no()}/{{nb}}", align="C")

    return _ReportPDF(format="A4")


# Side of the square each key image is fitted in (four in a row on A4), mm.
_KEY_IMAGE_BOX = 44.0


def _key_images(pdf: Any, images: tuple[bytes, ...]) -> None:
    """The key images in one row, each fitted in a square (aspect kept),
    under a heading kept on their page."""
    if not images:
        return
    from PIL import Image

    box = _KEY_IMAGE_BOX
    gap = (pdf.epw - 4 * box) / 3
    pdf.ln(3)
    if pdf.get_y() + 7 + box > pdf.page_break_trigger:
        pdf.add_page()
    pdf.set_font("body", size=11)
    pdf.cell(0, 7, "Ảnh chính / Key images", new_x="LMARGIN", new_y="NEXT")
    top = pdf.get_y()
    for n, data in enumerate(images[:4]):
        width, height = Image.open(io.BytesIO(data)).size
        scale = min(box / width, box / height)
        w, h = width * scale, height * scale
        pdf.image(io.BytesIO(data), x=pdf.l_margin + n * (box + gap) + (box - w) / 2, y=top + (box - h) / 2, w=w, h=h)
    pdf.set_y(top + box + 2)
    pdf.set_font("body", size=10)


def _letterhead(pdf: Any, head: Letterhead) -> None:
    """The logo, the left lines beside it and the right lines, each block
    centred in its half of the page as Vietnamese forms set them, the right
    one underlined (the national motto's rule); the text follows below."""
    from PIL import Image

    top, half = pdf.get_y(), pdf.epw / 2
    bottom = top
    left_x = pdf.l_margin
    if head.logo is not None:
        width, height = Image.open(io.BytesIO(head.logo)).size
        w = min(_LOGO_HEIGHT * width / height, _LOGO_MAX_WIDTH)
        h = w * height / width
        pdf.image(io.BytesIO(head.logo), x=pdf.l_margin, y=top, w=w, h=h)
        left_x += w + 2
        bottom = top + h
    pdf.set_font("body", size=10)
    blocks = ((left_x, pdf.l_margin + half - left_x, head.left, False), (pdf.l_margin + half, half, head.right, True))
    for x, width, lines, ruled in blocks:
        pdf.set_xy(x, top)
        for line in lines:
            pdf.set_x(x)
            pdf.multi_cell(width, 5, line, align="C", new_x="LEFT", new_y="NEXT")
        if lines and ruled:
            rule = min(pdf.get_string_width(lines[-1]), width)
            pdf.line(x + (width - rule) / 2, pdf.get_y() + 0.5, x + (width + rule) / 2, pdf.get_y() + 0.5)
        bottom = max(bottom, pdf.get_y())
    pdf.set_xy(pdf.l_margin, bottom + 4)


# Height of the signature block: date, title, room for a hand signature or
# the seal on a printed copy, the name.
_SIGNATURE_BLOCK = 5 * 3 + 14


def _signature_block(pdf: Any, content: ReportContent) -> None:
    """The right half's signature block of a Vietnamese result form: "Nam
    Định, ngày 15 tháng 01 năm 2024", the reader's title, space for the
    signature, the name; kept on one page."""
    if pdf.get_y() + _SIGNATURE_BLOCK + 6 > pdf.page_break_trigger:
        pdf.add_page()
    day = content.signed_at[:10]
    if len(day) == 10 and day[4] == day[7] == "-":
        dated = f"ngày {day[8:10]} tháng {day[5:7]} năm {day[:4]}"
        dated = f"{content.place}, {dated}" if content.place else dated[0].upper() + dated[1:]
    else:
        dated = content.place
    half = pdf.epw / 2
    x = pdf.l_margin + half
    for text, size, gap in ((dated, 10, 0.0), ("BÁC SĨ ĐỌC KẾT QUẢ / RADIOLOGIST", 10, 14.0),
                            (content.signed_by.replace("^", " "), 11, 0.0)):
        pdf.set_font("body", size=size)
        pdf.set_x(x)
        pdf.cell(half, 5, text, align="C", new_x="LEFT", new_y="NEXT")
        pdf.ln(gap)
    pdf.set_font("body", size=10)
    pdf.ln(2)


def _composed(content: ReportContent) -> ReportContent:
    """*content* with its text in Unicode NFC. Vietnamese typed with
    combining marks (Unikey's "Unicode tổ hợp", text pasted from such a
    document) is a letter followed by its marks; fpdf2 draws each mark as
    a glyph of its own, without stacking: the grave over the breve of "Hằng"
    was lost ("Hăng"). The precomposed letters are the font's own glyphs."""
    return replace(content, **{f.name: unicodedata.normalize("NFC", getattr(content, f.name))
                               for f in fields(content) if isinstance(getattr(content, f.name), str)})


def render(content: ReportContent) -> bytes:
    """The report as PDF bytes."""
    content = _composed(content)
    # fpdf (with fontTools) takes most of a second to import: loaded at the
    # first signed report, not at every start of pacs serve and the CLI.
    pdf = _report_pdf(content)
    pdf.alias_nb_pages()
    pdf.set_auto_page_break(auto=True, margin=18)  # room for the page number
    pdf.add_font("body", "", font_path())
    pdf.add_page()
    if content.letterhead:
        _letterhead(pdf, content.letterhead)
    if not content.letterhead.left:  # else the hospital is named there
        pdf.set_font("body", size=14)
        pdf.cell(0, 8, content.institution or "Filmless PACS", new_x="LMARGIN", new_y="NEXT", align="C")
    pdf.set_font("body", size=12)
    title = "KẾT QUẢ CHẨN ĐOÁN HÌNH ẢNH / IMAGING REPORT"
    if content.version > 1:
        title += f" (bổ sung / amended, v{content.version})"
    pdf.cell(0, 8, title, new_x="LMARGIN", new_y="NEXT", align="C")
    if content.critical is not None:
        pdf.set_text_color(180, 0, 0)
        flagged = "KẾT QUẢ NGUY KỊCH / CRITICAL RESULT" + (f": {content.critical}" if content.critical else "")
        pdf.multi_cell(0, 6, flagged, align="C", new_x="LMARGIN", new_y="NEXT")
        pdf.set_text_color(0, 0, 0)
    pdf.ln(2)
    pdf.set_font("body", size=10)
    rows = [
        ("Bệnh nhân / Patient", content.patient_name.replace("^", " ")),
        ("Mã BN / Patient ID", content.patient_id),
        ("Ngày sinh / Birth date", _date(content.birth_date)),
        ("Giới / Sex", content.sex),
        ("Ngày chụp / Study date", _date(content.study_date)),
        ("Số phiếu / Accession", content.accession),
        ("Kỹ thuật / Procedure", _text(f"{content.modalities} {content.description}".strip())),
    ]
    for label, value in rows:
        pdf.cell(55, 6, label)
        pdf.cell(0, 6, value, new_x="LMARGIN", new_y="NEXT")
    for heading, text in (("Mô tả / Findings", content.findings), ("Kết luận / Impression", content.impression)):
        pdf.ln(3)
        pdf.set_font("body", size=11)
        pdf.cell(0, 7, heading, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("body", size=10)
        pdf.multi_cell(0, 5.5, _text(text) or "-")
    _key_images(pdf, content.key_images)
    pdf.ln(5)
    _signature_block(pdf, content)
    pdf.cell(0, 6, f"Ký / Signed: {content.signed_by.replace('^', ' ')} — {content.signed_at}",
             new_x="LMARGIN", new_y="NEXT")
    if content.viewer_url:
        pdf.set_font("body", size=8)
        pdf.cell(0, 5, f"Xem ảnh / Images: {content.viewer_url}", new_x="LMARGIN", new_y="NEXT",
                 link=content.viewer_url)
    return bytes(pdf.output())
