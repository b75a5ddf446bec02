"""Saved measurements and annotations (đo đạc): what the radiologists drew
in the viewer, kept with the study and shown to whoever opens it again.

They are kept the DICOM way, as Grayscale Softcopy Presentation States
(:mod:`pacs.presentation_states`) in the study, so other viewers and
archives see them (a PR series) and no table of ours is needed; and the
presentation states a modality or another PACS sent are shown too. One
presentation state per radiologist and study, as a key image selection
(:mod:`pacs.key_images`) is: a new save is a new GSPS stored through the one
ingest path, after which the radiologist's previous ones are deleted through
the deletion path (each an audited ``delete`` event); an empty save deletes
them; the same measurements saved again write nothing.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid
from sqlalchemy import case, select

from storage import ObjectDamaged, ObjectNotFound, StorageError

from .app import Pacs
from .errors import RefusedRequest
from .header import valid_uid
from .index.models import Instance, Series
from .ingest import Origin
from .routing import VIEWER_SAVE_HOLD_SECONDS
from .key_images import Author, requested_procedure, study_header, study_instances, study_row, withdraw_own
from .part10 import BufferSource
from .presentation_states import (
    COLOUR_PHOTOMETRICS,
    STATE_CLASSES,
    KINDS,
    Measurement,
    PresentationState,
    Target,
    build_gsps,
    ds_value,
    by_class,
    grouped,
    measurements_of,
    read_presentation_state,
)
from .sr_content import is_sr_class
from .timezones import dicom_date_time, hospital_zone

log = logging.getLogger(__name__)
instances_t = Instance.__table__
series_t = Series.__table__

# The ingest origin of the presentation states saved here (the instances' source).
SOURCE = "annotations"
# Measurements one save holds at most (a radiologist draws a few dozen).
MAX_MEASUREMENTS = 500
# Characters of a label at most (a Text Object's Unformatted Text Value is ST: 1024).
MAX_LABEL = 1024
# Presentation states of one study read at most, and the bytes of one.
MAX_STATES = 200
# Points drawn of all the states of a study at most (each state's at most presentation_states.MAX_POINTS): a
# hundred hostile states must not hold gigabytes in one request.
MAX_STUDY_POINTS = 1_000_000
MAX_STATE_BYTES = 8 << 20
# Bytes of a measured image read for its header at most (an enhanced multi-frame's functional groups: megabytes).
MAX_HEADER_BYTES = 16 << 20


class AnnotationError(RefusedRequest):
    """A measurements request refused, with the HTTP status a client sees."""


@dataclass(frozen=True)
class Drawn:
    """A measurement as the viewer sends it: the image (instance, 1-based
    frame), the kind (length, angle, roi), its points in the frame's pixel
    grid and its label."""

    sop_uid: str
    frame: int
    kind: str
    points: tuple[tuple[float, float], ...]
    label: str = ""
    window: tuple[float, float] | None = None  # the window (centre, width) it was drawn in; None: the image's own


@dataclass(frozen=True)
class _Stored:
    """A GSPS of the study as stored: its index row and what it says (None: unreadable)."""

    pk: int
    sop_uid: str
    series_uid: str
    state: PresentationState | None
    error: str = ""
    here: bool = False  # saved here (the viewer's), not received: another site's may carry the same login

    def owned_by(self, username: str) -> bool:
        """Whether this is *username*'s own: saved here by them (a login alone is another site's too)."""
        return bool(username) and self.here and self.state is not None and self.state.login == username


def _read(pacs: Pacs, storage_key: str, size: int) -> bytes:
    if size > MAX_STATE_BYTES:
        raise ValueError(f"larger than {MAX_STATE_BYTES >> 20} MB")
    with pacs.store.open(storage_key) as stream:
        data: bytes = stream.read(MAX_STATE_BYTES + 1)
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"larger than {MAX_STATE_BYTES >> 20} MB")
    return data


def _stored_states(pacs: Pacs, study: Any) -> list[_Stored]:
    """The study's presentation states, oldest first, each read whole (a few kilobytes): at most MAX_STATES, the
    ones saved here among them whatever else the study holds."""
    with pacs.engine.connect() as conn:
        rows = conn.execute(
            select(instances_t.c.pk, instances_t.c.sop_uid, instances_t.c.storage_key, instances_t.c.size_bytes,
                   instances_t.c.source, series_t.c.series_uid)
            .join(series_t, series_t.c.pk == instances_t.c.series_pk)
            .where(series_t.c.study_pk == study.pk, instances_t.c.sop_class_uid.in_(STATE_CLASSES))
            # The radiologists' own (saved here) first, then the newest: a workstation's hundreds never hide them.
            .order_by(case((instances_t.c.source == SOURCE, 0), else_=1), instances_t.c.pk.desc()).limit(MAX_STATES)
        ).all()
    stored = []
    budget = MAX_STUDY_POINTS  # spent in that order: the ones saved here, then the newest
    for row in rows:
        try:
            data = _read(pacs, row.storage_key, int(row.size_bytes or 0))
            state = read_presentation_state(dcmread(io.BytesIO(data), force=True), row.series_uid, budget)
            budget -= state.points
        except (ObjectNotFound, ObjectDamaged, StorageError, InvalidDicomError, ValueError, TypeError, LookupError,
                AttributeError, ArithmeticError, EOFError, OSError) as exc:  # that one listed as unreadable, not all
            log.warning("presentation state %s of study %s cannot be read: %s", row.sop_uid, study.study_uid, exc)
            stored.append(_Stored(row.pk, row.sop_uid, row.series_uid, None, f"{type(exc).__name__}: {exc}"[:200],
                                  row.source == SOURCE))
            continue
        stored.append(_Stored(row.pk, row.sop_uid, row.series_uid, state, "", row.source == SOURCE))
    return sorted(stored, key=lambda s: s.pk)


def _view(pacs: Pacs, study: Any, stored: list[_Stored], username: str) -> dict[str, Any]:
    """The JSON of a study's annotations: the presentation states, one entry
    per image (and frame) of this study they draw on, and the caller's own
    measurements (``mine``, as the viewer sends them)."""
    states = [s.state for s in stored if s.state is not None]
    wanted = {a.sop_uid for state in states for a in state.annotations}
    with pacs.engine.connect() as conn:
        found = study_instances(conn, study.pk, wanted)
    images: list[dict[str, Any]] = []
    mine: list[dict[str, Any]] = []
    listed: list[dict[str, Any]] = []
    for s in stored:
        state = s.state
        if state is None:
            listed.append({"sop_uid": s.sop_uid, "series_uid": s.series_uid, "error": s.error})
            continue
        own = s.owned_by(username)
        listed.append(state.as_json(own=own))
        for annotation in state.annotations:
            row = found.get(annotation.sop_uid)
            if row is None:
                continue  # an image of another study, or not (yet) in the archive
            images.append({"sop_uid": annotation.sop_uid, "series_uid": row.series_uid,
                           "frame": annotation.frame, "state": state.sop_uid, "author": state.author,
                           "own": own, "layer": annotation.layer,
                           "graphics": [g.as_json() for g in annotation.graphics],
                           "texts": [t.as_json() for t in annotation.texts]})
        if own:
            for m in measurements_of(state):
                row = found.get(m["sop_uid"])
                if row is not None:
                    mine.append({**m, "series_uid": row.series_uid})
    return {"study_uid": study.study_uid, "states": listed, "images": images, "mine": mine}


def study_annotations(pacs: Pacs, study_uid: str, username: str = "") -> dict[str, Any]:
    """Every GSPS of a study, ours and foreign (*username*: whose are ``own``,
    and ``mine`` the measurements they saved)."""
    with pacs.engine.connect() as conn:
        study = study_row(conn, study_uid)
    return _view(pacs, study, _stored_states(pacs, study), username)


def _first_number(value: Any) -> float | None:
    """The first value of a numeric (DS) element; None when none or not a finite number."""
    if value is None or value == "":
        return None
    first = value[0] if isinstance(value, (list, MultiValue)) else value
    try:
        number = float(first)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _frame_group(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """An enhanced multi-frame's functional group *keyword* for *frame* (its per-frame one, else the shared)."""
    for holder, index in (("PerFrameFunctionalGroupsSequence", frame - 1), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(holder) or []
        if 0 <= index < len(items):
            group = items[index].get(keyword) or []
            if len(group):
                return group[0]  # type: ignore[no-any-return]
    return None


@dataclass(frozen=True)
class _Look:
    """How an image is shown: its rescale (slope, intercept, type), its own first window (centre, width) and
    its pixels' aspect ratio (vertical, horizontal)."""

    rescale: tuple[float, float, str] | None = None
    window: tuple[float, float] | None = None
    aspect: tuple[int, int] = (1, 1)
    icc: bytes = b""  # its ICC Profile (a colour image's)
    voi_lut: Dataset | None = None  # its first VOI LUT table, when it has no window


def _aspect(ds: Dataset, frame: int) -> tuple[int, int]:
    """The pixels' vertical to horizontal size as the viewer shows them (viewer_api.render: Pixel Spacing, else
    Imager Pixel Spacing, else Pixel Aspect Ratio; square when near it or beyond 1:4), as small integers."""
    for holder, keyword in ((_frame_group(ds, frame, "PixelMeasuresSequence"), "PixelSpacing"),
                            (ds, "PixelSpacing"), (ds, "ImagerPixelSpacing"), (ds, "PixelAspectRatio")):
        values = holder.get(keyword) if holder is not None else None
        if isinstance(values, (list, MultiValue)) and len(values) == 2:
            try:
                vertical, horizontal = float(values[0]), float(values[1])
            except (TypeError, ValueError):
                return 1, 1
            if not (vertical > 0 and horizontal > 0) or not 0.25 <= vertical / horizontal <= 4:
                return 1, 1
            ratio = Fraction(vertical / horizontal).limit_denominator(1000)
            return (1, 1) if abs(ratio - 1) < Fraction(1, 1000) else (ratio.numerator, ratio.denominator)
    return 1, 1


def _look(pacs: Pacs, row: Any, frame: int) -> _Look:
    """How the image *row* (frame *frame*) is shown, read from its header; nothing known (a state as without
    them) when it cannot be read."""
    limit = min(int(row.pixel_offset), MAX_HEADER_BYTES) if row.pixel_offset else MAX_HEADER_BYTES
    try:
        with pacs.store.open(row.storage_key, 0, limit) as stream:
            head = stream.read(limit)
        ds = dcmread(io.BytesIO(head), force=True, stop_before_pixels=True)
        pixel = _frame_group(ds, frame, "PixelValueTransformationSequence") or ds
        slope, intercept = _first_number(pixel.get("RescaleSlope")), _first_number(pixel.get("RescaleIntercept"))
        kind = str(pixel.get("RescaleType") or "").strip() or (
            "HU" if str(ds.get("Modality") or "").strip() == "CT" else "US")
        rescale = (slope if slope is not None else 1.0, intercept, kind) if intercept is not None else None
        window = None
        for holder in (_frame_group(ds, frame, "FrameVOILUTSequence"), ds):
            if holder is None:
                continue
            centre, width = _first_number(holder.get("WindowCenter")), _first_number(holder.get("WindowWidth"))
            if centre is not None and width is not None and width >= 1:
                window = (centre, width)
                break
    except (ObjectNotFound, ObjectDamaged, StorageError, InvalidDicomError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, ArithmeticError, EOFError, OSError) as exc:  # saved without VOI, Modality LUT
        log.warning("image %s: header not read for its presentation state: %s", row.sop_uid, exc)
        return _Look()
    icc = ds.get("ICCProfile")
    return _Look(rescale, window, _aspect(ds, frame), bytes(icc) if isinstance(icc, bytes) else b"",
                 None if window is not None else _voi_table(ds, frame))


def _voi_table(ds: Dataset, frame: int) -> Dataset | None:
    """The first VOI LUT table of the image (its frame's, else its own) as a new item (Descriptor, Data,
    Explanation: the elements as read, their VR kept); None when it has none usable."""
    for holder in (_frame_group(ds, frame, "FrameVOILUTSequence"), ds):
        items = holder.get("VOILUTSequence") if holder is not None else None
        if items and "LUTDescriptor" in items[0] and "LUTData" in items[0]:
            table = Dataset()
            for keyword in ("LUTDescriptor", "LUTExplanation", "LUTData"):
                if keyword in items[0]:
                    table[keyword] = items[0][keyword]
            return table
    return None


def _label(text: str) -> str:
    if "\x00" in text:
        raise AnnotationError("a label contains a NUL character (U+0000): remove it", 400)
    # One line break kept between lines (a ROI's figures); other control characters are spaces.
    lines = ["".join(c if c.isprintable() else " " for c in line).strip() for line in text.splitlines()]
    label = "\n".join(line for line in lines if line)
    if len(label) > MAX_LABEL:
        raise AnnotationError(f"a label is longer than {MAX_LABEL} characters", 400)
    return label


def _targets(pacs: Pacs, study_uid: str, drawn: list[Drawn], found: dict[str, Any]) -> list[Measurement]:
    """The measurements on their images (400 for an image not of the study,
    a frame it does not have, points off it, the wrong number of points)."""
    measurements = []
    looks: dict[tuple[str, int], Any] = {}
    # Each image's window: the first the viewer sent for it (the one it was measured in), else its own.
    windows: dict[str, tuple[float, float]] = {}
    for n, d in enumerate(drawn, 1):
        if d.window is None or d.sop_uid in windows:
            continue
        centre, width = d.window
        if not (math.isfinite(centre) and math.isfinite(width) and width >= 1 and abs(centre) < 1e9 > width):
            raise AnnotationError(f"measurement {n}: window {d.window} is no window (a centre, a width of 1 or more)",
                                  400)
        windows[d.sop_uid] = (ds_value(centre), ds_value(width))
    for n, d in enumerate(drawn, 1):
        row = found.get(d.sop_uid)
        if row is None:
            raise AnnotationError(f"measurement {n}: instance {d.sop_uid} is not in study {study_uid}", 400)
        if not (row.rows and row.columns) or is_sr_class(row.sop_class_uid):
            raise AnnotationError(f"measurement {n}: instance {d.sop_uid} is not an image "
                                  f"(SOP class {row.sop_class_uid})", 400)
        count = int(row.frames or 1)
        if not 1 <= d.frame <= count:
            raise AnnotationError(f"measurement {n}: instance {d.sop_uid} has no frame {d.frame} (it has {count})", 400)
        if d.kind not in KINDS:
            raise AnnotationError(f"measurement {n}: unknown kind {d.kind[:40]!r}: one of {', '.join(KINDS)}", 400)
        if len(d.points) != KINDS[d.kind]:
            raise AnnotationError(f"measurement {n}: a {d.kind} has {KINDS[d.kind]} points, not {len(d.points)}", 400)
        points = []
        for x, y in d.points:
            if not (math.isfinite(x) and math.isfinite(y) and 0 <= x <= row.columns and 0 <= y <= row.rows):
                raise AnnotationError(f"measurement {n}: point ({x}, {y}) is outside the image "
                                      f"(0..{row.columns}, 0..{row.rows})", 400)
            points.append((round(x, 2), round(y, 2)))
        if d.kind == "roi":
            (x0, y0), (x1, y1) = points
            points = [(min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1))]
            if points[0][0] == points[1][0] or points[0][1] == points[1][1]:
                raise AnnotationError(f"measurement {n}: an ROI needs a width and a height", 400)
        if (d.sop_uid, d.frame) not in looks:  # each image (frame) read once
            looks[(d.sop_uid, d.frame)] = _look(pacs, row, d.frame)
        look = looks[(d.sop_uid, d.frame)]
        target = Target(d.sop_uid, row.sop_class_uid, row.series_uid, int(row.columns), int(row.rows),
                        d.frame if count > 1 else None, (row.photometric or "").upper() == "MONOCHROME1",
                        look.rescale, windows.get(d.sop_uid, look.window), look.aspect,
                        (row.photometric or "").strip().upper() in COLOUR_PHOTOMETRICS, look.icc,
                        None if d.sop_uid in windows else look.voi_lut)
        measurements.append(Measurement(target, d.kind, tuple(points), _label(d.label)))
    return measurements


def _comparable(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(m["sop_uid"], m["frame"], m["kind"], tuple(tuple(p) for p in m["points"]), m["label"],
             tuple(m["window"]) if m["window"] else None) for m in items]


def _as_sent(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """*measurements* in the order a stored GSPS gives them back (by image, as grouped)."""
    return [{"sop_uid": m.target.sop_uid, "frame": m.target.frame or 1, "kind": m.kind,
             "points": [list(p) for p in m.points], "label": m.label,
             "window": list(m.target.window) if m.target.window else None}
            for _, items in grouped(measurements) for m in items]


def replace_measurements(pacs: Pacs, study_uid: str, drawn: list[Drawn], author: Author) -> dict[str, Any]:
    """Make *drawn* the measurements of *author* in the study (see the module
    docstring); an empty list removes them. Answers the study's annotations
    with ``states_saved`` (the GSPS now holding them, one per SOP class of
    the images measured; empty when removed),
    ``removed`` (the GSPS deleted) and ``stored`` (whether one was written)."""
    if len(drawn) > MAX_MEASUREMENTS:
        raise AnnotationError(f"at most {MAX_MEASUREMENTS} measurements may be saved", 400)
    for d in drawn:
        if not valid_uid(d.sop_uid):
            raise AnnotationError(f"invalid SOP Instance UID {d.sop_uid[:80]!r}", 400)
    with pacs.engine.connect() as conn:
        study = study_row(conn, study_uid)
        found = study_instances(conn, study.pk, {d.sop_uid for d in drawn})
        request = requested_procedure(conn, study)
    measurements = _targets(pacs, study_uid, drawn, found)
    stored = _stored_states(pacs, study)
    own = [s for s in stored if s.owned_by(author.username)]
    saved = sorted(_comparable([m for s in own if s.state is not None for m in measurements_of(s.state)]))
    if (measurements and len({s.series_uid for s in own}) == 1 and len(own) == len(by_class(measurements))
            and saved == sorted(_comparable(_as_sent(measurements)))):
        return {**_view(pacs, study, stored, author.username), "states_saved": [s.sop_uid for s in own],
                "removed": [], "stored": False}
    new_series = ""
    if measurements:
        # One presentation state per SOP class of the images measured, all in one new series.
        new_series = generate_uid()
        when = dicom_date_time(datetime.now(UTC), hospital_zone(pacs.settings))
        for number, part in enumerate(by_class(measurements), 1):
            _, data = build_gsps(study_header(study, request), part,
                                 author_name=author.display_name or author.username, login=author.username,
                                 when=when, series_uid=new_series, number=number)
            pacs.ingestor.ingest(BufferSource(b"", data), Origin(
                source=SOURCE, calling_ae=pacs.settings.ae_title, remote_host=author.client,
                user=author.username, route_hold_seconds=VIEWER_SAVE_HOLD_SECONDS))
        own = [s for s in _stored_states(pacs, study) if s.owned_by(author.username)]
    # Two saves at once by one radiologist: each keeps only the series of the newest row, so exactly one stays.
    newest = max(own, key=lambda s: s.pk, default=None)
    keep = newest.series_uid if newest is not None and measurements else None
    removed = []
    for old in own:
        if old.series_uid == keep:
            continue
        reason = (f"measurements of {author.username} replaced by series {new_series}" if new_series
                  else f"measurements of {author.username} cleared")
        if withdraw_own(pacs, study_uid, old.series_uid, old.sop_uid, author, reason, AnnotationError):
            removed.append(old.sop_uid)
    current = [s.sop_uid for s in own if s.series_uid == keep]
    return {**_view(pacs, study, _stored_states(pacs, study), author.username),
            "states_saved": current, "removed": removed, "stored": bool(new_series)}
