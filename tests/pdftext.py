"""Text of the report PDFs fpdf2 writes, for tests (pypdf is not a dependency)."""

from __future__ import annotations

import re
import zlib


def page_texts(pdf: bytes) -> list[str]:
    """The text of each page of an fpdf2 report (its strings are glyph IDs,
    decoded with the font's ToUnicode map), the strings of one text object
    joined, text objects one a line."""
    unicode: dict[int, str] = {}
    for block in re.findall(rb"beginbfchar(.*?)endbfchar", pdf, re.S):
        for code, char in re.findall(rb"<([0-9A-Fa-f]{4})>\s*<([0-9A-Fa-f]{4,8})>", block):
            unicode[int(code, 16)] = bytes.fromhex(char.decode()).decode("utf-16-be")
    pages = []
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        try:
            content = zlib.decompress(stream)
        except zlib.error:
            content = stream
        if b"Tj" not in content:
            continue  # a font, not a page
        lines = []
        for text_object in re.findall(rb"BT(.*?)ET", content, re.S):
            parts = []
            for literal in re.findall(rb"\(((?:\\.|[^\\)])*)\)\s*Tj", text_object, re.S):
                raw = re.sub(rb"\\([nrtbf()\\])", lambda m: {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b",
                                                             b"f": b"\f"}.get(m.group(1), m.group(1)), literal)
                parts.append("".join(unicode.get(int.from_bytes(raw[i:i + 2], "big"), "?")
                                     for i in range(0, len(raw) - 1, 2)))
            if parts:
                lines.append("".join(parts))
        pages.append("\n".join(lines))
    return pages
