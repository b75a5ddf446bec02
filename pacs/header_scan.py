"""The header of a received dataset read straight from its bytes.

pydicom's reader builds a Dataset element by element through Python-level
stream reads: ~0.6 ms for a CT header, a fifth of what a received object
costs us. The index needs ~30 top-level values; this scanner walks the
element headers of a dataset held in memory (Implicit or Explicit VR Little
Endian), keeps those values as slices of the received buffer, skips the
rest, and walks on past Pixel Data to prove the object is complete, all in
one pass.

It handles the ordinary case only. Anything else raises :class:`ScanFailed`
and the caller takes pydicom's path, which also words the error a peer sees:
big endian or deflated syntaxes, elements whose lengths run past the end,
implicit-VR elements inside an explicit-VR dataset, several character sets
(ISO 2022 code extensions), a VR the index cannot read as text or a number.
Sequences nested deeper than MAX_NESTING (counting sequences and items, of
defined or undefined length, anywhere in the dataset) raise
:class:`NestedTooDeep`: the object is refused, not handed to pydicom, whose
reader and JSON writer recurse once per level and fail a few hundred down.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from functools import lru_cache

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_dict

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
# Where pydicom's stop_before_pixels stops: Pixel Data, Float and Double Float Pixel Data.
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
OTHER_IDS_SEQUENCE = keyword_dict["OtherPatientIDsSequence"]
# Levels of sequences and items (a sequence in an item of a sequence is 3)
# any part of an accepted dataset may be nested in: real objects (SR content
# trees included) stay far below; pydicom's reader fails near 300.
MAX_NESTING = 32
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class ScanFailed(ValueError):
    """Not a dataset this scanner reads: use pydicom's reader."""


class NestedTooDeep(ScanFailed):
    """Sequences nested deeper than MAX_NESTING: no reader should try it."""


@lru_cache(maxsize=4096)
def implicit_vr(tag: int) -> str:
    """The dictionary VR of *tag* (Implicit VR datasets do not carry it)."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


class ScannedDataset:
    """What a scan found: chosen top-level values, Other Patient IDs items,
    and where Pixel Data starts (None when there is none)."""

    def __init__(self) -> None:
        self.values: dict[int, tuple[str, memoryview]] = {}
        self.other_id_items: list[dict[int, tuple[str, memoryview]]] = []
        self.pixel_offset: int | None = None


class _Scanner:
    def __init__(self, data: memoryview, explicit: bool) -> None:
        self.data = data
        self.size = len(data)
        self.explicit = explicit

    def header(self, pos: int) -> tuple[int, str, int, int]:
        """(tag, VR, value length, value offset) of the element at *pos*."""
        if pos + 8 > self.size:
            raise ScanFailed("truncated element header")
        group, element = _TAG.unpack_from(self.data, pos)
        tag = (group << 16) | element
        if group == 0xFFFE:
            return tag, "", _U32.unpack_from(self.data, pos + 4)[0], pos + 8
        if not self.explicit:
            return tag, implicit_vr(tag), _U32.unpack_from(self.data, pos + 4)[0], pos + 8
        vr = bytes(self.data[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > self.size:
                raise ScanFailed("truncated element header")
            return tag, vr.decode(), _U32.unpack_from(self.data, pos + 8)[0], pos + 12
        if not (vr.isalpha() and vr.isupper()):
            raise ScanFailed("implicit VR element in an explicit VR dataset")
        return tag, vr.decode(), _U16.unpack_from(self.data, pos + 6)[0], pos + 8

    def skip_undefined(self, pos: int, end_tag: int, depth: int, sequence: bool = False) -> int:
        """Offset after the delimiter that closes an undefined-length value
        (a *sequence*'s items are walked into, encapsulated fragments not)."""
        if depth > MAX_NESTING:
            raise NestedTooDeep(f"sequences nested more than {MAX_NESTING} levels deep")
        while True:
            tag, vr, length, start = self.header(pos)
            if tag == end_tag:
                return start
            pos = self.skip_value(tag, vr, length, start, depth + 1, item=sequence and tag == _ITEM)

    def skip_value(self, tag: int, vr: str, length: int, start: int, depth: int, *, item: bool = False) -> int:
        """Offset after the value at *start*. Sequences and their items are
        walked into even with a defined length (DCMTK sends them so), to
        count how deep they nest."""
        if length == _UNDEFINED:
            return self.skip_undefined(start, _ITEM_END if tag == _ITEM else _SEQ_END, depth, vr == "SQ")
        end = start + length
        if end > self.size:
            raise ScanFailed("value runs past the end of the dataset")
        if vr == "SQ" or item:
            if depth > MAX_NESTING:
                raise NestedTooDeep(f"sequences nested more than {MAX_NESTING} levels deep")
            pos = start
            while pos < end:
                tag, inner_vr, inner_length, inner_start = self.header(pos)
                pos = self.skip_value(tag, inner_vr, inner_length, inner_start, depth + 1,
                                      item=vr == "SQ" and tag == _ITEM)
            if pos != end:
                raise ScanFailed("sequence or item length does not match its contents")
        return end

    def items(self, start: int, length: int) -> Iterator[tuple[int, int]]:
        """(start, end) of each item's elements in a sequence value."""
        pos = start
        end = None if length == _UNDEFINED else start + length
        while end is None or pos < end:
            tag, _, item_length, item_start = self.header(pos)
            if tag == _SEQ_END and end is None:
                return
            if tag != _ITEM:
                raise ScanFailed("unexpected element in a sequence")
            if item_length == _UNDEFINED:
                after = self.skip_undefined(item_start, _ITEM_END, 1)
                yield item_start, after - 8
            else:
                after = self.skip_value(tag, "", item_length, item_start, 1, item=True)
                yield item_start, after
            pos = after
        if pos != end:
            raise ScanFailed("sequence length does not match its items")

    def elements(self, start: int, end: int) -> dict[int, tuple[str, memoryview]]:
        """The elements of one item (no deeper sequences are read)."""
        found: dict[int, tuple[str, memoryview]] = {}
        pos = start
        while pos < end:
            tag, vr, length, value = self.header(pos)
            pos = self.skip_value(tag, vr, length, value, 2)
            if length != _UNDEFINED and vr != "SQ":
                found[tag] = (vr, self.data[value:pos])
        return found


def leading_meta_length(data: memoryview, explicit: bool) -> int:
    """How many leading bytes of a Little Endian dataset are File Meta
    elements (group 0002), which belong in the Part 10 header only; 0 when
    there are none or they are not well-formed elements (the parser judges
    the dataset then)."""
    scanner = _Scanner(data, explicit)
    pos = 0
    try:
        while pos < scanner.size:
            tag, _, length, start = scanner.header(pos)
            if tag >> 16 != 0x0002:
                break
            if length == _UNDEFINED:
                return 0
            pos = scanner.skip_value(tag, "", length, start, 0)
    except ScanFailed:
        return 0
    return pos


def scan(data: memoryview, explicit: bool, wanted: frozenset[int]) -> ScannedDataset:
    """Walk a whole Little Endian dataset; keep the *wanted* top-level values."""
    scanner = _Scanner(data, explicit)
    result = ScannedDataset()
    pos = 0
    while pos < scanner.size:
        tag, vr, length, start = scanner.header(pos)
        if tag >> 16 in (0x0002, 0xFFFE):
            raise ScanFailed("file meta or delimiter among the dataset's elements")
        if tag in PIXEL_TAGS and result.pixel_offset is None:
            result.pixel_offset = pos
        if tag == OTHER_IDS_SEQUENCE and result.pixel_offset is None:
            for item_start, item_end in scanner.items(start, length):
                result.other_id_items.append(scanner.elements(item_start, item_end))
        end = scanner.skip_value(tag, vr, length, start, 0)
        if tag in wanted and result.pixel_offset is None and length != _UNDEFINED:
            result.values[tag] = (vr, data[start:end])
        pos = end
    return result


def single_codec(charset: memoryview | None) -> tuple[str | None, bool]:
    """(Python codec, declared?) for a Specific Character Set value; raises
    :class:`ScanFailed` for ISO 2022 code extensions (several sets)."""
    raw = bytes(charset or b"").decode("ascii", "replace")
    parts = [p.strip(" \x00") for p in raw.split("\\")]
    terms = parts if len(parts) > 1 else [p for p in parts if p]
    try:
        encodings = convert_encodings([t for t in terms if t] or None)
    except Exception as exc:
        raise ScanFailed(f"character set: {exc}") from None
    if len(encodings) != 1:
        raise ScanFailed("several character sets")
    if uses_code_extensions(terms):
        raise ScanFailed("ISO 2022 code extensions")
    return encodings[0], bool(terms)


def uses_code_extensions(terms: list[str]) -> bool:
    """True when a Specific Character Set allows ISO 2022 escape sequences
    (PS3.3 C.12.1.1.2): then a value is not one codec's text. "\\ISO 2022 IR
    149" names one set, but its Korean values are switched to by escapes,
    which a plain codec would keep as text."""
    return any(term.strip().startswith("ISO 2022") for term in terms)


__all__ = ["MAX_NESTING", "PIXEL_TAGS", "NestedTooDeep", "ScanFailed", "ScannedDataset", "implicit_vr", "scan", "single_codec", "uses_code_extensions"]
