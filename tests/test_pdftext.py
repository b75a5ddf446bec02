"""The tests' PDF text reader reads every page (it once lost a page whose
compressed content ended in a carriage return, and a CI run failed on it)."""

from __future__ import annotations

import zlib

from .pdftext import page_texts


def _pdf(content: bytes) -> bytes:
    """A PDF as fpdf2 lays one out: a ToUnicode map (glyph 1 is "A") and a
    compressed page whose data ends just before "\\nendstream"."""
    cmap = b"beginbfchar\n<0001> <0041>\nendbfchar"
    page = zlib.compress(content)
    return (b"%%PDF-1.3\n1 0 obj\n<<\n/Length %d\n>>\nstream\n%s\nendstream\nendobj\n" % (len(cmap), cmap)
            + b"2 0 obj\n<<\n/Filter /FlateDecode\n/Length %d\n>>\nstream\n%s\nendstream\nendobj\n%%%%EOF\n"
            % (len(page), page))


def test_a_page_whose_compressed_content_ends_in_a_carriage_return() -> None:
    # Spaces after ET change the checksum that ends the compressed data.
    content = next(c for c in (b"BT (\x00\x01\x00\x01) Tj ET" + b" " * n for n in range(100_000))
                   if zlib.compress(c).endswith(b"\r"))
    assert page_texts(_pdf(content)) == ["AA"]


def test_pages_of_other_endings() -> None:
    for n in range(300):
        assert page_texts(_pdf(b"BT (\x00\x01) Tj ET" + b" " * n)) == ["A"]
