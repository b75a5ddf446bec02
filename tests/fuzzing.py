"""Bad-input generators and fuzz drivers shared by the CI fuzz tests
(:mod:`tests.test_fuzz`, short) and the long run (``bench/fuzz.py``).

Every generator is a Hypothesis strategy that draws a small *recipe* (seed
name plus mutations) rather than the bytes themselves, so a failing example
prints readably and shrinks. Targets:

- ``ingest``: mutated Part 10 files into :meth:`pacs.ingest.Ingestor.ingest`
  in-process; only :class:`~pacs.errors.IngestError` may come out.
- ``pdu``: raw bytes on the DICOM port: malformed PDUs and A-ASSOCIATE-RQs,
  and malformed PDUs inside an established association.
- ``cstore``: valid associations sending malformed datasets (pynetdicom).
- ``hl7``: HL7 v2 over MLLP, broken framing and broken messages.
- ``http``: the HTTP API driven by schemathesis from ``/openapi.json``.

No pytest here: the bench imports this module too. Checks raise
:class:`AssertionError`; the drivers count inputs in a :class:`Tally`.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import socket
import struct
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pacs.dicom_net import request

from .dicomfiles import image_dataset
from .peers import PacsServer, plain_http_ssl, run_dcmtk

T = TypeVar("T")

TRACEBACK = "Traceback (most recent call last)"


# -- driving and counting ------------------------------------------------------------
@dataclass
class Budget:
    """How much fuzzing one target gets: an example count, and optionally a
    time limit (the bench's ``--minutes``) that repeats batches of examples."""

    examples: int
    seconds: float | None = None


@dataclass
class Tally:
    """Inputs tried against one target and what came back."""

    target: str
    inputs: int = 0
    crashes: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        """The line CI output shows: ``fuzz: <target>: N inputs, 0 crashes``."""
        return f"fuzz: {self.target}: {self.inputs} inputs, {self.crashes} crashes"

    def detail(self, top: int = 8) -> str:
        """The most frequent outcomes, for a human reading the log."""
        return ", ".join(f"{k} x{v}" for k, v in self.outcomes.most_common(top))


def drive(
    strategy: st.SearchStrategy[T],
    check: Callable[[T], str],
    budget: Budget,
    tally: Tally,
    *,
    shrink: bool = True,
) -> Tally:
    """Draw examples from *strategy* with Hypothesis and pass each to *check*,
    which returns an outcome label or raises (a crash).

    A failure is counted, shrunk (when *shrink*; network targets skip it to
    stay bounded in time) and re-raised with Hypothesis' falsifying example.
    """
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    deadline = time.monotonic() + budget.seconds if budget.seconds else None
    batch = budget.examples if deadline is None else min(budget.examples, 200)

    @settings(
        max_examples=batch,
        deadline=None,
        database=None,  # no .hypothesis/ folder in the repository
        phases=phases,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=False,
    )
    @given(strategy)
    def run(recipe: T) -> None:
        tally.inputs += 1
        try:
            tally.outcomes[check(recipe)] += 1
        except BaseException as exc:
            tally.outcomes["FAILED"] += 1
            # Hypothesis does not always print the example (unshrunk runs): say it here.
            exc.add_note(f"fuzz input: {recipe!r}"[:3000])
            raise

    while True:
        try:
            run()
        except BaseException:
            tally.crashes += 1
            raise
        if deadline is None or time.monotonic() >= deadline:
            return tally


# -- Part 10 seeds and their element layout ------------------------------------------
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
ALL_VRS = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD",
    b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
    b"UL", b"UN", b"UR", b"US", b"UT", b"UV",
]
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
UID_TAGS = {
    0x00020002: "MediaStorageSOPClassUID", 0x00020003: "MediaStorageSOPInstanceUID",
    0x00020010: "TransferSyntaxUID", 0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID",
}
CHARSET, PATIENT_NAME = 0x00080005, 0x00100010


@dataclass(frozen=True)
class Elem:
    """Where one encoded element header sits in a seed file."""

    offset: int  # first byte of the tag
    tag: int
    vr: bytes  # b"" for implicit VR and items/delimiters
    length_at: int
    length_size: int  # 2 or 4
    value_at: int
    length: int  # as encoded, UNDEFINED included
    in_meta: bool
    depth: int


@dataclass(frozen=True)
class Seed:
    """A valid Part 10 file to mutate, with its element table."""

    name: str
    data: bytes
    elems: tuple[Elem, ...]
    dataset_start: int
    transfer_syntax: str
    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str

    @property
    def little(self) -> bool:
        return self.transfer_syntax != EXPLICIT_BE

    @property
    def explicit(self) -> bool:
        return self.transfer_syntax != IMPLICIT_LE

    @property
    def header_end(self) -> int:
        """End of the header: where Pixel Data starts (or the file ends)."""
        for e in self.elems:
            if e.tag == PIXEL_DATA and e.depth == 0:
                return e.offset
        return len(self.data)


def index_elements(data: bytes) -> tuple[list[Elem], int, str]:
    """Element headers of a Part 10 file (meta and dataset, nested items too),
    its dataset offset and transfer syntax. Deflated datasets are opaque."""
    elems: list[Elem] = []
    pos = 132
    ts = ""
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        tag = (0x0002 << 16) | struct.unpack_from("<H", data, pos + 2)[0]
        vr = data[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            length = struct.unpack_from("<L", data, pos + 8)[0]
            elems.append(Elem(pos, tag, vr, pos + 8, 4, pos + 12, length, True, 0))
            value_at = pos + 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            elems.append(Elem(pos, tag, vr, pos + 6, 2, pos + 8, length, True, 0))
            value_at = pos + 8
        if tag == 0x00020010:
            ts = data[value_at : value_at + length].rstrip(b"\x00 ").decode()
        pos = value_at + length
    start = pos
    if ts == DEFLATED:
        return elems, start, ts
    explicit, order = ts != IMPLICIT_LE, (">" if ts == EXPLICIT_BE else "<")

    def walk(pos: int, end: int, depth: int, stop: int | None, datasets: bool) -> int:
        while pos + 8 <= end:
            group, element = struct.unpack_from(order + "HH", data, pos)
            tag = (group << 16) | element
            if group == 0xFFFE:
                vr, length_at, size = b"", pos + 4, 4
            elif explicit:
                vr = data[pos + 4 : pos + 6]
                length_at, size = (pos + 8, 4) if vr in LONG_VRS else (pos + 6, 2)
            else:
                vr, length_at, size = b"", pos + 4, 4
            length = struct.unpack_from(order + ("L" if size == 4 else "H"), data, length_at)[0]
            value_at = length_at + size
            elems.append(Elem(pos, tag, vr, length_at, size, value_at, length, False, depth))
            if tag in (ITEM_END, SEQ_END):
                pos = value_at
            elif length == UNDEFINED:
                if tag == ITEM:
                    pos = walk(value_at, end, depth + 1, ITEM_END, True)
                else:  # a sequence, or encapsulated pixel data (items are fragments)
                    pos = walk(value_at, end, depth + 1, SEQ_END, vr == b"SQ" or not explicit)
            elif (vr == b"SQ") or (tag == ITEM and datasets):
                walk(value_at, value_at + length, depth + 1, None, True)
                pos = value_at + length
            else:
                pos = value_at + length
            if stop is not None and tag == stop:
                return pos
        return pos

    walk(start, len(data), 0, None, True)
    return elems, start, ts


def _uid_value(data: bytes, elems: list[Elem], tag: int) -> str:
    for e in elems:
        if e.tag == tag and e.depth == 0:
            return data[e.value_at : e.value_at + e.length].rstrip(b"\x00 ").decode("ascii", "replace")
    return ""


def make_seed(name: str, data: bytes) -> Seed:
    """Index a valid Part 10 file as a mutation seed."""
    elems, start, ts = index_elements(data)
    sop_class = _uid_value(data, elems, 0x00080016) or _uid_value(data, elems, 0x00020002)
    sop_uid = _uid_value(data, elems, 0x00080018) or _uid_value(data, elems, 0x00020003)
    return Seed(
        name, data, tuple(elems), start, ts, sop_class, sop_uid,
        _uid_value(data, elems, 0x0020000D), _uid_value(data, elems, 0x0020000E),
    )


def _built_ct(transfer_syntax: str) -> bytes:
    """A tiny CT with a UTF-8 Vietnamese name and a sequence: the shapes the
    index reads (names, other IDs, UIDs, image attributes)."""
    from pydicom.dataset import Dataset
    from pydicom.filewriter import dcmwrite
    from pydicom.sequence import Sequence

    other = Dataset()
    other.PatientID = "DN4797912345678"
    other.IssuerOfPatientID = "BHYT"
    ds = image_dataset(SpecificCharacterSet="ISO_IR 192", StudyDate="20241121", StudyTime="090000",
                       AccessionNumber="FUZZ0001", ReferringPhysicianName="Đỗ^Thanh Tùng",
                       PatientName="Nguyễn^Văn An", PatientID="001085012345", PatientBirthDate="19850101",
                       PatientSex="M", OtherPatientIDsSequence=Sequence([other]), SeriesNumber=1, InstanceNumber=1,
                       Rows=8, Columns=8, PixelData=bytes(range(128)))
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    out = io.BytesIO()
    little = transfer_syntax != EXPLICIT_BE
    dcmwrite(out, ds, enforce_file_format=True, little_endian=little, implicit_vr=transfer_syntax == IMPLICIT_LE)
    return out.getvalue()


# Real files bundled with pydicom: JPEG 2000 (encapsulated, undefined length),
# deflated, big endian, an RT plan (nested sequences, no pixels).
PYDICOM_SEEDS = ("CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "image_dfl.dcm", "rtplan.dcm")


@cache
def seeds() -> dict[str, Seed]:
    """Every mutation seed by name (built once per process)."""
    from pydicom.data import get_testdata_file

    out = {
        "ct-explicit": make_seed("ct-explicit", _built_ct(EXPLICIT_LE)),
        "ct-implicit": make_seed("ct-implicit", _built_ct(IMPLICIT_LE)),
    }
    for name in PYDICOM_SEEDS:
        path = get_testdata_file(name, download=False)
        if path is None:
            raise FileNotFoundError(f"pydicom test file {name} missing (pip install pydicom-data)")
        out[name] = make_seed(name, Path(path).read_bytes())
    return out


# -- DICOM mutations -----------------------------------------------------------------
SPECIAL_LENGTHS = [0, 1, 2, 3, 7, 0xFF, 0x100, 0xFFFE, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, UNDEFINED]
BAD_UIDS = [
    b"", b"\x00", b"1", b"1.2.abc.3", b"1..2", b"01.2.3", b"1.2.3.", b".1.2", b"1.2.3\\1.2.4", b"1.2 .3",
    b"9" * 65, b"1." + b"2" * 63, b"1.2.840.10008.1.2.1\x00\x00", b"\xff\xfe1.2", "1.2.ế".encode(),
    b"1.2/../../etc", b"../x", b"1.2.3/4", b"%s%n", b"1.2.3\r\n", b"-1.2", b"1.2.-3", b" 1.2.3 ",
]
BAD_CHARSETS = [
    b"", b"ISO_IR 999", b"ISO 2022 IR 87\\ISO 2022 IR 13", b"\\\\\\", b"ISO_IR 192\\ISO_IR 100",
    b"ISO 2022 IR 6\\ISO 2022 IR 149\\ISO 2022 IR 58", b"GB18030", b"GBK", b"ISO_IR 13", b"ISO_IR 166",
    b"\xff\xfe\x00", b"UTF-8", b"ISO_IR 100 ", b"ISO 2022 IR 100\\ISO 2022 IR 126", b"\\ISO 2022 IR 87",
]
BAD_NAMES = [
    b"\xff\xfe\xfd", b"Nguy\xe1\xbb", b"\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B", b"\x1b$)C\x0e\xc8\xab\x0f",
    b"\xc3\x28", b"\xed\xa0\x80", b"A" * 70000, b"^^^^^", b"=" * 10, b"\x00\x00\x00\x00", b"\x1b\x1b\x1b",
    "Trần^Thị Bích Ngọc".encode("utf-16"), b"\xe0\x80\x80",
]


def _pack_length(order: str, size: int, value: int) -> bytes:
    return struct.pack(order + ("L" if size == 4 else "H"), value & (0xFFFFFFFF if size == 4 else 0xFFFF))


def encode_element(seed: Seed, tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One element in the seed's encoding; *length* overrides the true one."""
    order = "<" if seed.little else ">"
    head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    n = len(value) if length is None else length
    if (tag >> 16) == 0xFFFE or not seed.explicit:
        return head + _pack_length(order, 4, n) + value
    if vr in LONG_VRS or len(vr) != 2:
        return head + vr[:2].ljust(2, b"?") + b"\x00\x00" + _pack_length(order, 4, n) + value
    return head + vr + _pack_length(order, 2, min(n, 0xFFFF) if length is None else n) + value


@dataclass(frozen=True)
class DicomCase:
    """A recipe: a seed, one structural mutation, then byte-level mutations."""

    seed: str
    fresh_uids: int | None
    structural: tuple[Any, ...]
    byte_ops: tuple[tuple[Any, ...], ...]


def _elem_strategy() -> st.SearchStrategy[int]:
    return st.integers(0, 10_000)


def _raw_element() -> st.SearchStrategy[tuple[int, bytes, bytes, int | None]]:
    tags = st.one_of(
        st.integers(0, 0xFFFFFFFF),
        st.sampled_from([0x00020010, 0x00080005, 0x00100010, 0x7FE00010, ITEM, ITEM_END, SEQ_END, 0x00080018,
                         0xFFFFFFFF, 0x00000000, 0x00091010, 0x00280010, 0x00280008, 0x00081115]),
    )
    vrs = st.one_of(st.sampled_from(ALL_VRS), st.binary(min_size=2, max_size=2))
    lengths = st.one_of(st.none(), st.sampled_from(SPECIAL_LENGTHS))
    return st.tuples(tags, vrs, st.binary(max_size=300), lengths)


def dicom_cases(*, network: bool = False) -> st.SearchStrategy[DicomCase]:
    """Recipes of malformed Part 10 objects. With *network*, the File Meta is
    left intact (the sender needs it to pick the presentation context) and
    only the dataset is mutated."""
    names = sorted(seeds())
    idx = _elem_strategy()
    structural = st.one_of(
        st.tuples(st.just("length"), idx, st.one_of(st.sampled_from(SPECIAL_LENGTHS), st.integers(0, UNDEFINED))),
        st.tuples(st.just("length-delta"), idx, st.integers(-8, 8)),
        st.tuples(st.just("vr"), idx, st.one_of(st.sampled_from(ALL_VRS), st.binary(min_size=2, max_size=2))),
        st.tuples(st.just("value"), idx, st.binary(max_size=200), st.booleans()),
        st.tuples(st.just("uid"), idx, st.one_of(st.sampled_from(BAD_UIDS), st.binary(max_size=80))),
        st.tuples(st.just("charset"), st.one_of(st.sampled_from(BAD_CHARSETS), st.binary(max_size=40)),
                  st.one_of(st.none(), st.sampled_from(BAD_NAMES), st.binary(max_size=100))),
        st.tuples(st.just("insert"), idx, _raw_element()),
        st.tuples(st.just("delete"), idx),
        st.tuples(st.just("duplicate"), idx),
        st.tuples(st.just("truncate"), idx, st.integers(-4, 12)),
        st.tuples(st.just("nest"), idx, st.integers(1, 300), st.booleans()),
        st.tuples(st.just("huge-value"), idx, st.sampled_from([0x10000, 0x100000, 0x800000])),
        st.tuples(st.just("none")),
    )
    positions = st.tuples(st.sampled_from(["header", "any"]), st.integers(0, 2**24))
    byte_op = st.one_of(
        st.tuples(st.just("flip"), positions, st.integers(0, 7)),
        st.tuples(st.just("set"), positions, st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x20, 0x5C, 0x1B])),
        st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), positions, st.integers(1, 64)),
        st.tuples(st.just("truncate"), positions),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    )
    return st.builds(
        DicomCase,
        seed=st.sampled_from(names),
        fresh_uids=st.one_of(st.none(), st.integers(0, 10**9)),
        structural=structural,
        byte_ops=st.lists(byte_op, max_size=3).map(tuple),
    ) if not network else st.builds(
        DicomCase,
        seed=st.sampled_from([n for n in names if seeds()[n].sop_class]),
        fresh_uids=st.integers(0, 10**9),
        structural=structural,
        byte_ops=st.lists(byte_op, max_size=2).map(tuple),
    )


def _fresh(uid: str, salt: int) -> str:
    """A different UID of the same length (so the file's lengths stay right)."""
    head, _, last = uid.rpartition(".")
    if not head or not last:
        return uid
    digits = str(salt).zfill(len(last))[-len(last):]
    last = ("1" + digits[1:]) if len(last) > 1 else str(salt % 9 + 1)
    return f"{head}.{last}"


def apply_case(case: DicomCase, *, network: bool = False) -> bytes:
    """The bytes a recipe stands for."""
    seed = seeds()[case.seed]
    data = seed.data
    if case.fresh_uids is not None:
        for uid in {seed.sop_uid, seed.study_uid, seed.series_uid} - {""}:
            data = data.replace(uid.encode(), _fresh(uid, case.fresh_uids + len(uid)).encode())
    order = "<" if seed.little else ">"
    targets = [e for e in seed.elems if not (network and e.in_meta)]
    if seed.transfer_syntax == DEFLATED and not network:
        targets = list(seed.elems)  # the meta is all we can address
    base = seed.dataset_start if network else 0

    def pick(i: int, among: list[Elem] | None = None) -> Elem | None:
        pool = targets if among is None else among
        return pool[i % len(pool)] if pool else None

    kind, *args = case.structural
    if kind == "length" and (e := pick(args[0])):
        data = data[: e.length_at] + _pack_length(order if not e.in_meta else "<", e.length_size, args[1]) + data[e.length_at + e.length_size :]
    elif kind == "length-delta" and (e := pick(args[0])):
        data = data[: e.length_at] + _pack_length(order if not e.in_meta else "<", e.length_size, e.length + args[1]) + data[e.length_at + e.length_size :]
    elif kind == "vr" and (e := pick(args[0], [t for t in targets if t.vr])):
        data = data[: e.offset + 4] + args[1] + data[e.offset + 6 :]
    elif kind == "value" and (e := pick(args[0], [t for t in targets if t.length != UNDEFINED])):
        value = args[1] if args[2] else args[1][: e.length].ljust(e.length, b"\x00")
        size = len(value) if e.length_size == 4 else min(len(value), 0xFFFF)
        data = (data[: e.length_at] + _pack_length(order if not e.in_meta else "<", e.length_size, size)
                + value[:size] + data[e.value_at + e.length :])
    elif kind == "uid" and (e := pick(args[0], [t for t in targets if t.tag in UID_TAGS and t.depth == 0])):
        value = args[1][:0xFFFF]
        data = (data[: e.length_at] + _pack_length(order if not e.in_meta else "<", e.length_size, len(value))
                + value + data[e.value_at + e.length :])
    elif kind == "charset" and seed.transfer_syntax != DEFLATED:
        charset, name = args
        top = [t for t in seed.elems if t.depth == 0 and not t.in_meta]
        cs = next((t for t in top if t.tag == CHARSET), None)
        pn = next((t for t in top if t.tag == PATIENT_NAME), None)
        edits: list[tuple[int, int, bytes]] = []  # (start, end, replacement), applied back to front
        if pn is not None and name is not None:
            edits.append((pn.offset, pn.value_at + pn.length, encode_element(seed, PATIENT_NAME, b"PN", name)))
        new_cs = encode_element(seed, CHARSET, b"CS", charset)
        if cs is not None:
            edits.append((cs.offset, cs.value_at + cs.length, new_cs))
        else:
            at = next((t.offset for t in top if t.tag > CHARSET), len(seed.data))
            edits.append((at, at, new_cs))
        # Fresh UIDs keep their length, so the seed's offsets still hold.
        for start, end, new in sorted(edits, reverse=True):
            data = data[:start] + new + data[end:]
    elif kind == "insert" and (e := pick(args[0])):
        tag, vr, value, length = args[1]
        data = data[: e.offset] + encode_element(seed, tag, vr, value, length) + data[e.offset :]
    elif kind == "delete" and (e := pick(args[0], [t for t in targets if t.length != UNDEFINED])):
        data = data[: e.offset] + data[e.value_at + e.length :]
    elif kind == "duplicate" and (e := pick(args[0], [t for t in targets if t.length != UNDEFINED])):
        chunk = data[e.offset : e.value_at + e.length]
        data = data[: e.offset] + chunk + data[e.offset :]
    elif kind == "truncate" and (e := pick(args[0])):
        data = data[: max(base, e.offset + args[1])]
    elif kind == "nest" and (e := pick(args[0], [t for t in targets if not t.in_meta])):
        depth, closed = args[1], args[2]
        sq = encode_element(seed, 0x00081115, b"SQ", b"", UNDEFINED)
        item = encode_element(seed, ITEM, b"", b"", UNDEFINED)
        inner = (sq + item) * depth
        if closed:
            inner += (encode_element(seed, ITEM_END, b"", b"") + encode_element(seed, SEQ_END, b"", b"")) * depth
        data = data[: e.offset] + inner + data[e.offset :]
    elif kind == "huge-value" and (e := pick(args[0], [t for t in targets if not t.in_meta and t.depth == 0])):
        value = bytes([0x41]) * args[1]
        data = data[: e.offset] + encode_element(seed, 0x00104000, b"LT", value) + data[e.offset :]

    header_end = seed.header_end
    for op in case.byte_ops:
        if not data:
            break
        name = op[0]
        if name == "append":
            data += op[1]
            continue
        region, raw = op[1]
        low = base if network else 0
        high = min(header_end, len(data)) if region == "header" else len(data)
        if high <= low:
            high = len(data)
        if high <= low:
            break
        pos = low + raw % (high - low)
        if name == "flip":
            data = data[:pos] + bytes([data[pos] ^ (1 << op[2])]) + data[pos + 1 :]
        elif name == "set":
            data = data[:pos] + bytes([op[2]]) + data[pos + 1 :]
        elif name == "insert":
            data = data[:pos] + op[2] + data[pos:]
        elif name == "delete":
            data = data[:pos] + data[pos + op[2] :]
        elif name == "truncate":
            data = data[: max(pos, base)]
    return data


# -- target: ingest in-process -------------------------------------------------------
def ingest_checker(pacs: Any) -> Callable[[DicomCase], str]:
    """A check that feeds one mutated object to the core's ingest: it must
    store it or refuse it with an :class:`IngestError` carrying a status a
    peer understands (never any other exception)."""
    from pacs.errors import IngestError, Status
    from pacs.ingest import Origin
    from pacs.part10 import BufferSource

    refusals = {Status.CANNOT_UNDERSTAND, Status.INVALID_DATASET}

    def check(case: DicomCase) -> str:
        data = apply_case(case)
        try:
            result = pacs.ingestor.ingest(BufferSource(b"", data), Origin("fuzz", calling_ae="FUZZ"))
        except IngestError as exc:
            assert exc.status in refusals, f"bad input answered 0x{exc.status:04X} ({exc.reason}); expected a refusal"
            assert exc.reason.strip(), "refusal without a reason"
            return f"0x{exc.status:04X}"
        assert result.status == Status.SUCCESS
        return result.outcome.value

    return check


def assert_store_consistent(pacs: Any) -> int:
    """Every index row has its object, every object its row, nothing staged.
    Returns the number of indexed instances."""
    indexed = {row.storage_key for row in pacs.reader.iter_stored()}
    stored = {info.key for info in pacs.store.list()}
    missing = indexed - stored
    assert not missing, f"index rows without their object: {sorted(missing)[:5]}"
    orphans = stored - indexed
    assert not orphans, f"objects without an index row: {sorted(orphans)[:5]}"
    if hasattr(pacs.store, "staged_files"):
        staged = pacs.store.staged_files()
        assert not staged, f"staged files left behind: {staged[:5]}"
    return len(indexed)


@contextmanager
def core_on(data_dir: Path, index_url: str | None = None) -> Iterator[Any]:
    """A :class:`~pacs.app.Pacs` on a temporary data dir (SQLite and files
    unless *index_url* says otherwise), no disk low-water mark."""
    from pacs.app import Pacs
    from pacs.settings import load_settings

    settings = load_settings(data_dir=data_dir, index_url=index_url, min_free_bytes=0)
    pacs = Pacs.open(settings)
    try:
        yield pacs
    finally:
        pacs.close()


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom warns (and logs) about every invalid value: by design, here."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def fuzz_ingest(pacs: Any, budget: Budget, tally: Tally | None = None) -> Tally:
    """Mutated Part 10 objects into the ingest function; then the invariants."""
    with quiet_pydicom():
        tally = drive(dicom_cases(), ingest_checker(pacs), budget, tally or Tally("ingest"))
    assert_store_consistent(pacs)
    return tally


# -- the DICOM port: raw PDUs --------------------------------------------------------
VERIFICATION = b"1.2.840.10008.1.1"
CT_STORAGE = b"1.2.840.10008.5.1.4.1.1.2"
APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPL_UID = b"1.2.826.0.1.3680043.9.7433.1.1"
PDU_TYPES = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07}


def _item(kind: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">BBH", kind, 0, n & 0xFFFF) + payload


def _pdu(kind: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">BBL", kind & 0xFF, 0, n & 0xFFFFFFFF) + payload


def ae_field(title: bytes) -> bytes:
    return title[:16].ljust(16, b" ")


def associate_rq(
    called: bytes = b"FILMLESS",
    calling: bytes = b"FUZZER",
    contexts: list[tuple[int, bytes, list[bytes]]] | None = None,
    *,
    version: int = 1,
    app_context: bytes = APP_CONTEXT,
    max_length: int = 16384,
    extra_user_items: bytes = b"",
    pdu_type: int = 0x01,
) -> bytes:
    """Encode an A-ASSOCIATE-RQ (PS3.8 9.3.2) with every field choosable."""
    if contexts is None:
        contexts = [(1, VERIFICATION, [IMPLICIT_LE.encode()]), (3, CT_STORAGE, [EXPLICIT_LE.encode()])]
    items = _item(0x10, app_context)
    for ctx_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract) + b"".join(_item(0x40, ts) for ts in syntaxes)
        items += _item(0x20, struct.pack(">BBBB", ctx_id & 0xFF, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_length & 0xFFFFFFFF)) + _item(0x52, IMPL_UID) + extra_user_items
    items += _item(0x50, user)
    body = struct.pack(">HH", version & 0xFFFF, 0) + ae_field(called) + ae_field(calling) + bytes(32) + items
    return _pdu(pdu_type, body)


@dataclass(frozen=True)
class PduCase:
    """Bytes to send on a fresh connection; *associate* first opens a valid
    association and the bytes then go inside it."""

    label: str
    payload: bytes
    associate: bool = False
    cut: int | None = None  # send only this many bytes, then close abruptly


def _ae_titles() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from([b"", b" " * 16, b"\x00" * 16, b"FILM\x00LESS", b"FILMLESS\r\n", b"\x1b[31mX", b"\\\\",
                         "ÁÉÍ".encode(), b"\xff" * 16, b"filmless", b"FILMLESS" * 3]),
        st.binary(max_size=20),
    )


def _uids() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from([VERIFICATION, CT_STORAGE, IMPLICIT_LE.encode(), EXPLICIT_LE.encode(), b"", b"\x00",
                         b"1.2.abc", b"9" * 70, b"1.2.840.10008.1.2.4.999", b"1" * 2000]),
        st.binary(max_size=70),
    )


@st.composite
def pdu_cases(draw: Callable[..., Any], called: bytes = b"FILMLESS") -> PduCase:
    """Malformed PDUs: noise, wrong types, broken A-ASSOCIATE-RQs, absurd
    lengths, bad AE titles, and bad PDUs inside an established association."""
    kind = draw(st.sampled_from(["noise", "type", "rq", "rq-bytes", "length", "in-assoc", "abrupt"]))
    if kind == "noise":
        return PduCase(kind, draw(st.binary(min_size=1, max_size=2048)))
    if kind == "type":
        pdu_type = draw(st.one_of(st.integers(0, 255), st.sampled_from(sorted(PDU_TYPES))))
        return PduCase(f"type-{pdu_type:02x}", _pdu(pdu_type, draw(st.binary(max_size=512))))
    if kind == "length":
        # An absurd length and then little or nothing: the server must not
        # allocate it or wait for it once the peer is gone.
        pdu_type = draw(st.sampled_from([0x01, 0x04, 0x05, 0x07, 0x42]))
        length = draw(st.sampled_from([0, 1, 5, 0x7FFFFFFF, 0xFFFFFFFF, 0x10000000]))
        return PduCase(f"length-{pdu_type:02x}", _pdu(pdu_type, draw(st.binary(max_size=64)), length))
    if kind in ("rq", "rq-bytes"):
        n = draw(st.integers(0, 4))
        contexts = [
            (draw(st.integers(0, 255)), draw(_uids()), draw(st.lists(_uids(), max_size=3)))
            for _ in range(n)
        ]
        if draw(st.booleans()):
            contexts.append((1, VERIFICATION, [IMPLICIT_LE.encode()]))
        extra = draw(st.one_of(
            st.just(b""),
            st.builds(lambda k, p: _item(k, p), st.sampled_from([0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x99]),
                      st.binary(max_size=80)),
        ))
        rq = associate_rq(
            called=draw(st.one_of(st.just(called), _ae_titles())),
            calling=draw(st.one_of(st.just(b"FUZZER"), _ae_titles())),
            contexts=contexts,
            version=draw(st.sampled_from([1, 0, 2, 0xFFFF])),
            app_context=draw(st.one_of(st.just(APP_CONTEXT), _uids())),
            max_length=draw(st.sampled_from([0, 1, 16384, 0xFFFFFFFF])),
            extra_user_items=extra,
        )
        if kind == "rq-bytes":
            # Structural damage on top: truncation, a bit flip, a wrong length.
            op = draw(st.sampled_from(["truncate", "flip", "pdu-length", "item-length"]))
            pos = draw(st.integers(0, len(rq) - 1))
            if op == "truncate":
                rq = rq[: max(1, pos)]
            elif op == "flip":
                rq = rq[:pos] + bytes([rq[pos] ^ (1 << draw(st.integers(0, 7)))]) + rq[pos + 1 :]
            elif op == "pdu-length":
                rq = rq[:2] + struct.pack(">L", draw(st.integers(0, 0xFFFFFFFF))) + rq[6:]
            else:
                at = 74 + draw(st.integers(0, max(0, len(rq) - 78)))
                rq = rq[: at + 2] + struct.pack(">H", draw(st.integers(0, 0xFFFF))) + rq[at + 4 :]
            return PduCase(f"rq-{op}", rq)
        return PduCase("rq", rq)
    # Inside an established association (Verification on context 1).
    if kind == "abrupt":
        pdv = _pdv(1, 0x01, _echo_command())
        cut = draw(st.integers(1, len(pdv) + 5))
        return PduCase("abrupt-pdata", _pdu(0x04, pdv), associate=True, cut=cut)
    choice = draw(st.sampled_from(["pdv-length", "pdv-context", "pdv-header", "command", "state", "garbage"]))
    if choice == "pdv-length":
        content = _echo_command()
        pdv = struct.pack(">LBB", draw(st.integers(0, 0xFFFFFFFF)), 1, 0x03) + content
        payload = _pdu(0x04, pdv)
    elif choice == "pdv-context":
        payload = _pdu(0x04, _pdv(draw(st.integers(0, 255)), 0x03, _echo_command()))
    elif choice == "pdv-header":
        payload = _pdu(0x04, _pdv(1, draw(st.integers(0, 255)), _echo_command()))
    elif choice == "command":
        command = bytearray(_echo_command())
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(command) - 1))
            command[pos] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            command = bytearray(draw(st.binary(max_size=200)))
        payload = _pdu(0x04, _pdv(1, 0x03, bytes(command)))
    elif choice == "state":
        # PDUs that are valid but wrong at this point of the protocol.
        payload = draw(st.sampled_from([
            associate_rq(), _pdu(0x02, bytes(68)), _pdu(0x03, b"\x00\x01\x01\x01"), _pdu(0x06, bytes(4)),
            _pdu(0x05, bytes(4)) + _pdu(0x05, bytes(4)), _pdu(0x04, b""), _pdu(0x05, bytes(2)),
        ]))
    else:
        payload = draw(st.binary(min_size=1, max_size=512))
    return PduCase(f"assoc-{choice}", payload, associate=True)


def _pdv(context_id: int, header: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context_id & 0xFF, header & 0xFF) + data


def _echo_command() -> bytes:
    """A C-ECHO-RQ command set (implicit VR little endian)."""
    def el(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value

    uid = VERIFICATION + (b"\x00" if len(VERIFICATION) % 2 else b"")
    body = el(0x00000002, uid) + el(0x00000100, struct.pack("<H", 0x0030)) + el(0x00000110, struct.pack("<H", 1)) \
        + el(0x00000800, struct.pack("<H", 0x0101))
    return el(0x00000000, struct.pack("<L", len(body))) + body


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Read until the peer closes or *timeout*; (raw bytes, closed)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    raw = b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:  # reset: a close as well
            return raw, True
        if not chunk:
            return raw, True
        raw += chunk
    return raw, False


def read_pdus(sock: socket.socket, timeout: float) -> tuple[list[int], bytes, bool]:
    """Read until the peer closes or *timeout*; (PDU types, raw bytes, closed)."""
    raw, closed = read_until_closed(sock, timeout)
    types, pos = [], 0
    while pos + 6 <= len(raw):
        kind, length = raw[pos], struct.unpack_from(">L", raw, pos + 2)[0]
        types.append(kind)
        pos += 6 + length
    return types, raw, closed


def _establish(port: int, called: bytes, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(associate_rq(called=called))
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        assert chunk, "connection closed instead of A-ASSOCIATE-AC to a valid request"
        head += chunk
    assert head[0] == 0x02, f"valid A-ASSOCIATE-RQ answered with PDU type {head[0]:#04x}"
    remaining = struct.unpack(">L", head[2:6])[0]
    while remaining:
        chunk = sock.recv(remaining)
        assert chunk, "connection closed in the middle of A-ASSOCIATE-AC"
        remaining -= len(chunk)
    return sock


def pdu_checker(port: int, called: bytes, *, timeout: float = 20.0, answer_wait: float = 0.15) -> Callable[[PduCase], str]:
    """A check that sends one :class:`PduCase` and closes its side: the server
    must answer with well-formed PDUs (reject, abort, or protocol answers)
    and close the connection, within *timeout*."""

    def check(case: PduCase) -> str:
        if case.associate:
            sock = _establish(port, called, timeout)
        else:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        with sock:
            payload = case.payload if case.cut is None else case.payload[: case.cut]
            try:
                sock.sendall(payload)
                if case.cut is not None:
                    # Abrupt close mid-P-DATA: RST instead of an orderly FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return "abrupt-close"
                # Give the server a moment to answer while the connection is
                # open (pynetdicom drops a request whose peer already left),
                # then close our side: it must close too, not wait forever.
                types, raw, closed = read_pdus(sock, answer_wait)
                if not closed:
                    sock.shutdown(socket.SHUT_WR)
                    more_types, more, closed = read_pdus(sock, timeout)
                    types, raw = types + more_types, raw + more
            except OSError:
                return "closed-while-sending"  # the server closed first: acceptable
        assert closed, f"{case.label}: connection still open {timeout}s after the peer stopped sending"
        unknown = [t for t in types if t not in PDU_TYPES]
        assert not unknown, f"{case.label}: server sent unknown PDU types {unknown}: {raw[:64]!r}"
        if not types:
            return "closed"
        return "+".join(f"{t:02x}" for t in types[:3])

    return check


# -- the DICOM port: valid associations, malformed datasets --------------------------
class NotSendable(Exception):
    """The mutation broke what the *sender* reads (pynetdicom takes the
    presentation context and Affected UIDs from the File Meta, and treats
    group 0002 elements inserted right after it as File Meta too): the
    input never reaches the server, so it is counted but tests nothing."""


class CStoreSender:
    """One pynetdicom association that sends mutated datasets exactly as
    built (the chunked file path: no re-encoding), reopened if it drops."""

    def __init__(self, port: int, called: str, workdir: Path) -> None:
        from pynetdicom import AE

        self.port, self.called, self.workdir = port, called, workdir
        self.ae = AE(ae_title="FUZZSCU")
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        self.pairs = {(s.sop_class, s.transfer_syntax) for s in seeds().values() if s.sop_class}
        for sop_class, ts in sorted(self.pairs):
            self.ae.add_requested_context(sop_class, ts)
        self.assoc: Any = None
        self.associations = 0

    def _open(self) -> Any:
        if self.assoc is None or not self.assoc.is_established:
            # Through pacs.dicom_net.request: a response pynetdicom's reactor
            # takes in its pause race goes back to the waiting send_c_store
            # (pacs.dicom_net.keep_responses; CI's fuzz test lost one).
            self.assoc = request(self.ae.associate, "127.0.0.1", self.port, ae_title=self.called)
            assert self.assoc.is_established, "a valid association was refused during the fuzz run"
            self.associations += 1
        return self.assoc

    def send(self, data: bytes) -> int | None:
        """C-STORE one Part 10 file's dataset bytes; the status, or None if
        the association ended without a response."""
        from pynetdicom import _config
        from pynetdicom.dsutils import split_dataset

        path = self.workdir / f"{uuid.uuid4().hex}.dcm"
        path.write_bytes(data)
        try:
            meta, _ = split_dataset(path)
            uids = [meta[k].value if k in meta else None for k in
                    ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")]
        except Exception as exc:
            path.unlink()
            raise NotSendable(f"file meta unreadable: {exc}") from exc
        if not all(isinstance(u, str) for u in uids) or (uids[0], uids[2]) not in self.pairs:
            path.unlink()
            raise NotSendable(f"file meta as the sender reads it: {uids!r:.200}")
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            status = self._open().send_c_store(path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
            path.unlink()
        if status is None or "Status" not in status:
            return None
        return int(status.Status)

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def cstore_checker(sender: CStoreSender) -> Callable[[DicomCase], str]:
    """A check that sends one malformed dataset inside a valid association:
    the answer must be a C-STORE response with success or a refusal status
    (0xA900 / 0xC000, or 0x0111 when what the damaged header names is a SOP
    Instance UID already kept in another study or series), never silence or
    an internal error."""
    allowed = {0x0000, 0xA900, 0xC000, 0x0111}

    def check(case: DicomCase) -> str:
        data = apply_case(case, network=True)
        try:
            status = sender.send(data)
        except NotSendable:
            return "not-sendable"
        assert status is not None, f"no C-STORE response to a malformed dataset ({case.structural[0]})"
        assert status in allowed, f"malformed dataset answered 0x{status:04X}"
        return f"0x{status:04X}"

    return check


# -- HL7 v2 over MLLP ----------------------------------------------------------------
VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"


def good_orm(control: str, accession: str) -> bytes:
    """A valid ORM^O01 new order (UTF-8, Vietnamese names)."""
    return "\r".join([
        f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20241120083000||ORM^O01|{control}|P|2.5|||||VN|UNICODE UTF-8",
        "PID|1||001085012345^^^CCCD^NI~DN4797912345678^^^BHYT^HC||Nguyễn^Văn An||19850101|M",
        "PV1|1|O||||||BS001^Đỗ^Thanh Tùng",
        f"ORC|NW|P{accession}|F{accession}||SC",
        f"OBR|1|P{accession}|F{accession}|CT-NGUC^CT ngực^L|||20241121090000|||||||||||{accession}|"
        f"RP{accession}|SPS{accession}||||CT|||^^^20241121090000^^R",
    ]).encode("utf-8")


@dataclass(frozen=True)
class Hl7Case:
    """Bytes for one MLLP connection and how many framed messages they hold
    (each must be answered by one ACK unless the server closes first)."""

    label: str
    payload: bytes
    framed: int


def _frame(message: bytes) -> bytes:
    return VT + message + FS + CR


@st.composite
def hl7_cases(draw: Callable[..., Any]) -> Hl7Case:
    """Broken MLLP framing and broken HL7 v2 messages."""
    control = f"FZ{draw(st.integers(0, 10**9))}"
    accession = f"FZ{draw(st.integers(0, 10**9))}"
    message = good_orm(control, accession)
    kind = draw(st.sampled_from([
        "noise", "no-msh", "encoding-chars", "huge-segment", "non-utf8", "field-noise", "segments",
        "framing", "msh-short", "delimiters", "many", "msh18", "bytes",
    ]))
    if kind == "noise":
        body = draw(st.binary(max_size=1024)).replace(VT, b"").replace(FS, b"")
        return Hl7Case(kind, _frame(body), 1)
    if kind == "no-msh":
        body = message.split(b"\r", 1)[1]
        if draw(st.booleans()):
            body = body.replace(b"PID", b"MSH", 1)[:40]
        return Hl7Case(kind, _frame(body), 1)
    if kind == "encoding-chars":
        chars = draw(st.binary(min_size=0, max_size=6)).replace(VT, b"").replace(FS, b"").replace(CR, b"")
        return Hl7Case(kind, _frame(message.replace(b"|^~\\&|", b"|" + chars + b"|", 1)), 1)
    if kind == "msh-short":
        cut = draw(st.integers(3, 40))
        return Hl7Case(kind, _frame(message[:cut]), 1)
    if kind == "delimiters":
        sep = draw(st.sampled_from([b"^", b"~", b"\\", b"&", b"\r", b"\x00", b"\xff", b"M", b" "]))
        return Hl7Case(kind, _frame(b"MSH" + sep + message[4:]), 1)
    if kind == "huge-segment":
        size = draw(st.sampled_from([70_000, 1_000_000, 4_000_000]))
        filler = draw(st.sampled_from([b"A", b"^", b"~", b"|", b"\\", b"&"])) * size
        where = draw(st.sampled_from(["pid", "new", "msh"]))
        if where == "pid":
            body = message.replace(b"Nguy", filler + b"Nguy", 1)
        elif where == "msh":
            body = message.replace(b"|HIS|", b"|" + filler + b"|", 1)
        else:
            body = message + b"\rNTE|1||" + filler
        return Hl7Case(f"huge-{where}", _frame(body), 1)
    if kind == "non-utf8":
        bad = draw(st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xe0\x80\x80", b"\x80"]))
        body = message.replace("Nguyễn".encode(), bad, 1)
        if draw(st.booleans()):
            body = body.replace(b"UNICODE UTF-8", draw(st.sampled_from([b"8859/1", b"ASCII", b"UNKNOWN", b""])), 1)
        return Hl7Case(kind, _frame(body), 1)
    if kind == "msh18":
        value = draw(st.one_of(st.sampled_from([b"UNICODE UTF-8", b"8859/15", b"ASCII", b"ISO IR87", b"\xff"]),
                               st.binary(max_size=20))).replace(VT, b"").replace(FS, b"").replace(CR, b"")
        return Hl7Case(kind, _frame(message.replace(b"UNICODE UTF-8", value, 1)), 1)
    if kind == "field-noise":
        segments = message.split(b"\r")
        i = draw(st.integers(0, len(segments) - 1))
        fields = segments[i].split(b"|")
        j = draw(st.integers(1 if i == 0 else 0, len(fields) - 1)) if len(fields) > 1 else 0
        noise = draw(st.one_of(
            st.binary(max_size=60),
            st.sampled_from([b"", b"^^^^", b"~~~", b"\\E\\\\F\\", b"\\", b"&&&", b"99999999999999999999",
                             b"-1", b"CA", b"XO", b"DC", b"ZZ", b"00000000", b"2024-13-45", b"\x00"]),
        )).replace(VT, b"").replace(FS, b"")
        fields[j] = noise
        segments[i] = b"|".join(fields)
        return Hl7Case(f"field-{i}-{j}", _frame(b"\r".join(segments)), 1)
    if kind == "segments":
        segments = message.split(b"\r")
        op = draw(st.sampled_from(["drop", "duplicate", "shuffle", "zds", "empty"]))
        if op == "drop":
            del segments[draw(st.integers(1, len(segments) - 1))]
        elif op == "duplicate":
            segments.append(segments[draw(st.integers(1, len(segments) - 1))])
        elif op == "shuffle":
            rest = segments[1:]
            random.Random(draw(st.integers(0, 1000))).shuffle(rest)
            segments = segments[:1] + rest
        elif op == "zds":
            segments.append(b"ZDS|" + draw(st.sampled_from([b"1.2.abc", b"9" * 100, b"", b"^^^", b"1.2.3"])) + b"^100")
        else:
            segments += [b"", b"", b"|||"]
        return Hl7Case(f"segments-{op}", _frame(b"\r".join(segments)), 1)
    if kind == "many":
        n = draw(st.integers(2, 5))
        body = b"".join(_frame(good_orm(f"{control}-{i}", f"{accession}-{i}").replace(b"ORM^O01", b"ORM^O99"))
                        for i in range(n))
        return Hl7Case(kind, body, n)
    if kind == "framing":
        op = draw(st.sampled_from(["no-end", "fs-no-cr", "double-vt", "prefix-noise", "no-vt", "split-end",
                                   "lf-end", "empty"]))
        if op == "no-end":
            return Hl7Case(op, VT + message, 0)
        if op == "fs-no-cr":
            return Hl7Case(op, VT + message + FS, 0)
        if op == "double-vt":
            return Hl7Case(op, VT + VT + message + FS + CR, 1)
        if op == "prefix-noise":
            noise = draw(st.binary(max_size=100)).replace(VT, b"")
            return Hl7Case(op, noise + _frame(message), 1)
        if op == "no-vt":
            return Hl7Case(op, message + FS + CR, 0)
        if op == "split-end":
            return Hl7Case(op, VT + message + FS + b"X" + CR, 0)
        if op == "lf-end":
            return Hl7Case(op, VT + message + FS + b"\n", 0)
        return Hl7Case(op, _frame(b""), 1)
    body = draw(st.binary(min_size=1, max_size=2048))
    return Hl7Case("bytes", body, 0)  # no promise on how many frames random bytes hold


def mllp_exchange(port: int, payload: bytes, timeout: float = 20.0) -> tuple[list[bytes], bool]:
    """Send *payload*, close our side, read every framed reply until the
    server closes; (ACK messages, closed within *timeout*)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return [], True
        raw, closed = read_until_closed(sock, timeout)
    acks = re.findall(rb"\x0b(.*?)\x1c\r", raw, re.S)
    return acks, closed


def _msa(ack: bytes) -> str:
    for segment in ack.split(b"\r"):
        if segment.startswith(b"MSA|"):
            return segment.split(b"|")[1].decode("ascii", "replace")
    return ""


def hl7_checker(port: int) -> Callable[[Hl7Case], str]:
    """A check that sends one :class:`Hl7Case`: each framed message gets an
    ACK with MSA-1 AA/AE/AR (AA only if the message is still a valid one),
    then the server closes cleanly, in time."""

    def check(case: Hl7Case) -> str:
        acks, closed = mllp_exchange(port, case.payload)
        assert closed, f"{case.label}: MLLP connection not closed after the peer finished"
        codes = [_msa(a) for a in acks]
        assert all(c in ("AA", "AE", "AR") for c in codes), f"{case.label}: ACKs without a valid MSA-1: {acks[:2]!r}"
        if case.framed:
            assert len(acks) == case.framed, f"{case.label}: {case.framed} framed messages, {len(acks)} ACKs"
        return f"{case.label.split('-')[0]}:{'/'.join(sorted(set(codes))) or 'closed'}"

    return check


def assert_hl7_serving(port: int) -> None:
    """A good ORM^O01 still gets AA."""
    tag = uuid.uuid4().hex[:10].upper()
    acks, _ = mllp_exchange(port, _frame(good_orm(f"OK{tag}", f"OK{tag}")))
    assert acks and _msa(acks[0]) == "AA", f"a good ORM^O01 was not accepted after the fuzz: {acks!r}"


# -- HTTP (schemathesis) -------------------------------------------------------------
def load_openapi(server: PacsServer, token: str) -> Any:
    """The live server's OpenAPI description as a schemathesis schema."""
    import schemathesis

    base = f"http://127.0.0.1:{server.http_port}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", headers={"Authorization": f"Bearer {token}"},
                                           timeout=30)
    return schema


def http_operations(schema: Any) -> list[Any]:
    """Every API operation of *schema*."""
    return [result.ok() for result in schema.get_all_operations()]


def http_strategy(operation: Any, path_parameters: dict[str, str] | None = None) -> st.SearchStrategy[Any]:
    """Valid-per-schema and schema-violating requests for one operation; with
    *path_parameters*, real UIDs so the handlers go past the 404."""
    from schemathesis import GenerationMode

    strategies = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        try:
            strategies.append(operation.as_strategy(generation_mode=mode, path_parameters=path_parameters or None))
        except Exception:  # no negative space for an operation without parameters
            continue
    return st.one_of(*strategies)


def http_checker(server: PacsServer, token: str, *, request_timeout: float = 30.0) -> Callable[[Any], str]:
    """A check that sends one schemathesis case: no 5xx (``not_a_server_error``),
    an answer within *request_timeout*."""
    from schemathesis.checks import not_a_server_error

    base = f"http://127.0.0.1:{server.http_port}"
    headers = {"Authorization": f"Bearer {token}"}

    def check(case: Any) -> str:
        start = time.monotonic()
        response = case.call(base_url=base, headers=headers, timeout=request_timeout)
        case.validate_response(response, checks=[not_a_server_error], headers=headers)
        elapsed = time.monotonic() - start
        assert elapsed < request_timeout, f"{case.method} {case.path} took {elapsed:.1f}s"
        return str(response.status_code)

    return check


# Operations that would end the fuzzer's own session: run with a throwaway token.
SESSION_ENDING = {("POST", "/api/auth/logout")}


def _needs_radiologist(method: str, path: str) -> bool:
    """Report writes are for radiologists only: an admin token gets 403 and
    never reaches the handler, so those operations run as a radiologist."""
    return method in ("POST", "PUT") and "/report" in path


def fuzz_http(server: PacsServer, budget: Budget, path_values: dict[str, str], *,
              token: str | None = None, tally: Tally | None = None) -> Tally:
    """Schemathesis over every operation of ``/openapi.json``; *budget* is per
    operation (half random path parameters, half the real ones in
    *path_values* where the operation has any)."""
    token = token or server.token
    schema = load_openapi(server, token)
    tally = tally or Tally("http")
    radiologist: str | None = None
    for operation in http_operations(schema):
        key = (operation.method.upper(), operation.path)
        op_token = token
        if key in SESSION_ENDING:
            op_token = server.make_token(f"fuzz-logout-{uuid.uuid4().hex[:8]}", "admin")
        elif _needs_radiologist(*key):
            radiologist = radiologist or server.make_token(f"fuzz-rad-{uuid.uuid4().hex[:8]}", "radiologist")
            op_token = radiologist
        check = http_checker(server, op_token)
        names = re.findall(r"{(\w+)}", operation.path)
        real = {n: path_values[n] for n in names if n in path_values}
        half = Budget(max(1, budget.examples // 2), budget.seconds / 2 if budget.seconds else None)
        if real:
            drive(http_strategy(operation), check, half, tally, shrink=False)
            drive(http_strategy(operation, real), check, half, tally, shrink=False)
        else:
            drive(http_strategy(operation), check, budget, tally, shrink=False)
    return tally


# -- HTTP: what the OpenAPI description cannot say -----------------------------------
# DICOMweb and WADO-URI read their query parameters, Accept headers and STOW
# bodies by hand (PS3.18 defines them), so /openapi.json declares none of them
# and schemathesis only varies their paths. These strategies cover the rest.
ODD_VALUES = [
    "", "*", "?", "**", "-", "20240101-", "-20240101", "20240101-20231231", "2024-01-01", "99999999", "abc", "\\",
    "a\\b\\c", "1.2.3\\1.2.4", "NGUY*", "%", "_", "' OR 1=1--", "\x00", "nan", "inf", "-inf", "-1", "0", "1e309",
    "9" * 30, "-" + "9" * 30, "x" * 5000, "true", "false", "all", "Nguyễn*", "=?", "^^^", "1,2", "1.5", " ", "\r\n",
]
QIDO_KEYS = [
    "limit", "offset", "fuzzymatching", "includefield", "PatientName", "PatientID", "PatientBirthDate", "StudyDate",
    "StudyTime", "AccessionNumber", "ModalitiesInStudy", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "Modality", "InstanceNumber", "SeriesNumber", "ReferringPhysicianName", "StudyDescription", "00100010",
    "0020000D", "00080060", "00200013", "7FE00010", "NumberOfStudyRelatedInstances", "SOPClassUID",
]
ACCEPTS = [
    "application/dicom", "application/dicom; transfer-syntax=*", "application/dicom; transfer-syntax=1.2.3",
    'multipart/related; type="application/dicom"; transfer-syntax=*',
    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
    'multipart/related; type="application/octet-stream"', "multipart/related; type=application/octet-stream; transfer-syntax=*",
    'multipart/related; type="image/jpeg"', "application/dicom+json", "application/json", "image/jpeg", "image/png",
    "image/gif", "image/jp2", "text/html", "*/*", "*/*;q=2", "image/*;q=abc", ";;;,,,", "", "application/zip",
    'multipart/related; type="application/dicom"; boundary=x', "image/jpeg, image/png;q=0.5",
]


@dataclass(frozen=True)
class WebCase:
    """One HTTP request the OpenAPI description does not spell out."""

    label: str
    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None


def _odd_text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(ODD_VALUES), st.text(max_size=40))


def _header_text() -> st.SearchStrategy[str]:
    """Printable ASCII: what an HTTP client can put in a header at all."""
    return st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


def _numberish() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(-(10**30), 10**30).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(ODD_VALUES),
    )


def _stow_body(draw: Callable[..., Any], boundary: str) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["dicom", "dicom", "bytes", "json", "empty"]))
        if kind == "dicom":
            content = apply_case(draw(dicom_cases()))
        elif kind == "bytes":
            content = draw(st.binary(max_size=400))
        elif kind == "json":
            content = b'[{"00080018": {"vr": "UI", "Value": ["1.2.3"]}}]'
        else:
            content = b""
        ctype = draw(st.sampled_from(["application/dicom", "application/dicom", "application/dicom+json",
                                      "application/octet-stream", "", "text/plain; charset=\xff"]))
        head = f"Content-Type: {ctype}\r\n" if ctype else ""
        parts.append(f"--{boundary}\r\n{head}\r\n".encode("utf-8", "replace") + content + b"\r\n")
    body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) or not parts else b"")
    op = draw(st.sampled_from(["keep", "keep", "truncate", "garbage-prefix", "no-crlf"]))
    if op == "truncate" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif op == "garbage-prefix":
        body = draw(st.binary(max_size=50)) + body
    elif op == "no-crlf":
        body = body.replace(b"\r\n", b"\n")
    return body


@st.composite
def web_cases(draw: Callable[..., Any], uids: dict[str, str]) -> WebCase:
    """QIDO parameters, WADO-RS Accept headers, frames, bulk data, rendering
    parameters, WADO-URI and STOW-RS bodies, with real and bogus UIDs."""
    def uid(name: str) -> str:
        # Percent-encoded: the server must see the odd text, not the client refuse it.
        return quote(draw(st.one_of(st.just(uids[name]), st.sampled_from(["1.2.3", "1.2.abc", "0", "9" * 70, ".."]),
                                    st.text(max_size=20))), safe="")

    study, series, sop = uid("study"), uid("series"), uid("sop")
    inst = f"/dicom-web/studies/{study}/series/{series}/instances/{sop}"
    accept = (("Accept", draw(st.one_of(st.sampled_from(ACCEPTS), _header_text()))),) if draw(st.booleans()) else ()
    kind = draw(st.sampled_from(["qido", "retrieve", "frames", "bulk", "rendered", "wado-uri", "stow"]))
    if kind == "qido":
        path = draw(st.sampled_from([
            "/dicom-web/studies", "/dicom-web/series", "/dicom-web/instances", f"/dicom-web/studies/{study}/series",
            f"/dicom-web/studies/{study}/instances", f"/dicom-web/studies/{study}/series/{series}/instances",
        ]))
        keys = st.one_of(st.sampled_from(QIDO_KEYS), st.text(min_size=1, max_size=12))
        params = tuple(draw(st.lists(st.tuples(keys, _odd_text()), max_size=4)))
        return WebCase("qido", "GET", path, params, accept)
    if kind == "retrieve":
        path = draw(st.sampled_from([inst, f"/dicom-web/studies/{study}", f"/dicom-web/studies/{study}/series/{series}",
                                     inst + "/metadata", f"/dicom-web/studies/{study}/metadata"]))
        return WebCase("retrieve", "GET", path, (), accept)
    if kind == "frames":
        frames = draw(st.one_of(st.lists(st.integers(-5, 10**12), min_size=1, max_size=4).map(
            lambda xs: ",".join(map(str, xs))), _odd_text()))
        suffix = draw(st.sampled_from(["", "/rendered", "/thumbnail"]))
        return WebCase("frames", "GET", f"{inst}/frames/{quote(frames, safe=',')}{suffix}", (), accept)
    if kind == "bulk":
        tag = draw(st.one_of(st.sampled_from(["7FE00010", "00100010", "7fe00010", "FFFFFFFF", "00000000", "7FE0001"]),
                             st.text(max_size=10)))
        return WebCase("bulk", "GET", f"{inst}/bulk/{quote(tag, safe='')}", (), accept)
    if kind == "rendered":
        path = draw(st.sampled_from([inst + "/rendered", inst + "/thumbnail", f"/dicom-web/studies/{study}/rendered",
                                     f"/dicom-web/studies/{study}/series/{series}/thumbnail", inst + "/frames/1/rendered"]))
        params: list[tuple[str, str]] = []
        if draw(st.booleans()):
            fn = draw(st.sampled_from(["linear", "sigmoid", "linear_exact", "LINEAR", "", "x"]))
            params.append(("window", f"{draw(_numberish())},{draw(_numberish())},{fn}"))
        if draw(st.booleans()):
            params.append(("viewport", ",".join(draw(st.lists(_numberish(), min_size=0, max_size=6)))))
        if draw(st.booleans()):
            params.append(("quality", draw(_numberish())))
        if draw(st.booleans()):
            params.append((draw(st.sampled_from(["annotation", "charset", "iccprofile", "x"])), draw(_odd_text())))
        return WebCase("rendered", "GET", path, tuple(params), accept)
    if kind == "wado-uri":
        names = ["requestType", "studyUID", "seriesUID", "objectUID", "contentType", "transferSyntax", "windowCenter",
                 "windowWidth", "rows", "columns", "imageQuality", "frameNumber", "anonymize", "charset"]
        valid = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop}
        values = {
            "contentType": st.one_of(st.sampled_from(["image/jpeg", "image/png", "image/gif", "application/dicom",
                                                      "image/jpeg,application/dicom", "text/plain", ""]), st.text(max_size=20)),
            "transferSyntax": st.one_of(st.sampled_from(["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50",
                                                         "1.2.840.10008.1.2.4.90", "1.2.3"]), st.text(max_size=20)),
        }
        params = [(n, v) for n, v in valid.items() if draw(st.integers(0, 9)) > 0]
        for name in draw(st.lists(st.sampled_from(names), max_size=5)):
            params.append((name, draw(values.get(name, _numberish()))))
        return WebCase("wado-uri", "GET", "/wado", tuple(params), accept)
    boundary = draw(st.sampled_from(["fuzzboundary", "x", "a b", "=?", "-" * 80]))
    ctype = draw(st.sampled_from([
        f'multipart/related; type="application/dicom"; boundary={boundary}',
        f"multipart/related; type=application/dicom; boundary=\"{boundary}\"",
        f"multipart/related; boundary={boundary}", 'multipart/related; type="application/dicom"',
        f'multipart/related; type="application/dicom+json"; boundary={boundary}', "application/dicom",
        f"multipart/form-data; boundary={boundary}", "", "multipart/related; boundary=",
    ]))
    body = _stow_body(draw, boundary)
    path = draw(st.sampled_from(["/dicom-web/studies", f"/dicom-web/studies/{study}"]))
    return WebCase("stow", "POST", path, (), (("Content-Type", ctype), *accept), body)


def web_checker(server: PacsServer, token: str, *, request_timeout: float = 30.0) -> Callable[[WebCase], str]:
    """A check that sends one :class:`WebCase`: no 5xx, an answer in time."""
    import httpx

    base = f"http://127.0.0.1:{server.http_port}"

    def check(case: WebCase) -> str:
        headers = {"Authorization": f"Bearer {token}", **dict(case.headers)}
        start = time.monotonic()
        # A fresh connection per request: a refused request may close its own (the SSL context
        # shared: httpx made one per client, ~40 ms, for an http:// URL that never uses it).
        with httpx.Client(base_url=base, timeout=request_timeout, verify=plain_http_ssl()) as client:
            try:
                response = client.request(case.method, case.path, params=list(case.params), headers=headers,
                                          content=case.body)
            except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError):
                return "client-refused"  # nothing reached the server
        elapsed = time.monotonic() - start
        assert response.status_code < 500, (
            f"{case.method} {response.request.url} answered {response.status_code}: {response.text[:300]}")
        assert elapsed < request_timeout, f"{case.method} {case.path} took {elapsed:.1f}s"
        return f"{case.label}:{response.status_code}"

    return check


def fuzz_web(server: PacsServer, budget: Budget, path_values: dict[str, str], *, token: str | None = None,
             tally: Tally | None = None) -> Tally:
    """DICOMweb and WADO-URI parameters, headers and STOW bodies."""
    with quiet_pydicom():
        return drive(web_cases(path_values), web_checker(server, token or server.token), budget,
                     tally or Tally("dicomweb"),
                     shrink=False)


# -- the server stays healthy --------------------------------------------------------
def good_ct_file(workdir: Path) -> Path:
    """A valid CT object with fresh UIDs (to prove stores still work)."""
    seed = seeds()["ct-explicit"]
    data = apply_case(DicomCase("ct-explicit", random.randrange(10**9), ("none",), ()))
    path = workdir / f"good-{uuid.uuid4().hex}.dcm"
    path.write_bytes(data)
    assert seed.sop_uid.encode() not in data
    return path


def log_mark(server: PacsServer) -> int:
    """Where the server log ends now: pass it as *since* to check only what
    one target logged."""
    return len(server.log_text())


def assert_serving(server: PacsServer, workdir: Path, since: int = 0) -> None:
    """The process is alive, its log (from *since* on) holds no traceback,
    and DCMTK's echoscu and storescu of a good file still succeed."""
    assert server.alive(), "pacs serve died during the fuzz run:\n" + server.log_text()[-4000:]
    log = server.log_text()[since:]
    assert TRACEBACK not in log, "traceback in the server log:\n" + log[max(0, log.index(TRACEBACK) - 200) :][:6000]
    echo = run_dcmtk("echoscu", "-aet", "GOODPEER", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port),
                     timeout=60)
    assert echo.returncode == 0, f"echoscu failed after the fuzz: {echo.stderr[-2000:]}"
    store = server.storescu(str(good_ct_file(workdir)), calling="GOODPEER")
    assert store.returncode == 0, f"storescu of a good file failed after the fuzz: {store.stderr[-2000:]}"


def assert_health(server: PacsServer) -> None:
    """``GET /health`` answers 200 with status ok."""
    import httpx

    response = httpx.get(f"http://127.0.0.1:{server.http_port}/health", timeout=30)
    assert response.status_code == 200, f"/health answered {response.status_code} after the fuzz: {response.text[:500]}"


def assert_all_serving(server: PacsServer, workdir: Path, since: int = 0) -> None:
    """Everything a fuzz run must leave working: the process, a clean log,
    DICOM echo and store (DCMTK), a good HL7 order over MLLP, and /health."""
    assert_serving(server, workdir, since)
    assert_hl7_serving(server.hl7_port)
    assert_health(server)


def fuzz_pdus(server: PacsServer, budget: Budget, tally: Tally | None = None) -> Tally:
    """Raw malformed PDUs against the DICOM port."""
    return drive(pdu_cases(server.ae_title.encode()), pdu_checker(server.dicom_port, server.ae_title.encode()),
                 budget, tally or Tally("pdu"), shrink=False)


def fuzz_cstore(server: PacsServer, budget: Budget, tally: Tally | None = None) -> Tally:
    """Malformed datasets in valid associations."""
    with tempfile.TemporaryDirectory(prefix="fuzz-cstore-") as workdir:
        sender = CStoreSender(server.dicom_port, server.ae_title, Path(workdir))
        try:
            with quiet_pydicom():  # the sender's pydicom reads the mutated File Meta
                return drive(dicom_cases(network=True), cstore_checker(sender), budget, tally or Tally("cstore"),
                             shrink=False)
        finally:
            sender.close()


def fuzz_hl7(server: PacsServer, budget: Budget, tally: Tally | None = None) -> Tally:
    """Broken HL7 v2 / MLLP against the HL7 port."""
    return drive(hl7_cases(), hl7_checker(server.hl7_port), budget, tally or Tally("hl7"), shrink=False)


def stored_path_values(server: PacsServer, workdir: Path) -> dict[str, str]:
    """Store a good object and return its UIDs as path parameter values."""
    path = good_ct_file(workdir)
    assert server.storescu(str(path)).returncode == 0
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return {
        "study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID), "sop": str(ds.SOPInstanceUID),
        "accession": str(ds.AccessionNumber), "frame_list": "1", "tag": "7FE00010",
    }


def env_flag(name: str, default: int) -> int:
    """An integer from the environment (lets CI scale the short run)."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
