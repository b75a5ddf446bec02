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
    for stream in _streams(pdf):
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


def _streams(pdf: bytes) -> list[bytes]:
    """Each stream's bytes, /Length of them: compressed data may end in a
    carriage return, which a search for the end-of-line before "endstream"
    would take away (the page then failed to decompress, about 1 in 256)."""
    streams = []
    for start in re.finditer(rb"(?<!end)stream\r?\n", pdf):
        dictionary = pdf[pdf.rfind(b"obj", 0, start.start()):start.start()]
        length = re.findall(rb"/Length (\d+)(?! \d+ R)", dictionary)
        if length:
            streams.append(pdf[start.end():start.end() + int(length[0])])
        else:  # an indirect length: up to the end-of-line before "endstream"
            end = pdf.find(b"endstream", start.end())
            streams.append(pdf[start.end():end].removesuffix(b"\n").removesuffix(b"\r"))
    return streams
