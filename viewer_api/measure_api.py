"""The viewer's measurement API (JSON): a frame's calibration, the
statistics of a region of its stored pixel values in modality units, and
the value of one pixel (:mod:`viewer_api.measure` says how).

Under ``/api/studies/{study}/series/{series}/instances/{sop}/frames/{frame}``
(*frame* is 1-based; 1 for a single-frame instance):

- ``GET .../calibration``: rows, columns, the spacing in mm and its basis,
  ultrasound regions, pixel aspect ratio, the modality unit (header only).
- ``GET .../roi?shape=ellipse|rectangle&x0=&y0=&x1=&y1=``: pixel count,
  mean, SD, min, max, area of the drawn shape.
- ``GET .../pixel?x=&y=``: the stored value and the modality value there.

Coordinates are the frame's pixel grid ((0, 0) the top left corner of the
first pixel). GET with query parameters, as every image read of the API:
nothing is stored here (a radiologist's measurements are saved apart: annotations_api). The frame is
decoded as a rendering is (:func:`rendering.frame_work`: the renders'
concurrency bound and the process's pixel budget). Readers of images may
measure them: the study in the path goes through the same access check
(a referring physician: their own patients' studies) and the same audit
event (``retrieve``) as the rendered images.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import pydicom
from fastapi import APIRouter, Query, Request

from pacs import frames as framelib
from pacs.auth import Principal
from pacs.pixel_memory import PIXELS
from pacs.retrieve import RetrieveItem

from . import measure, negotiation
from .errors import HTTPProblem
from .mediatypes import Offer, negotiate
from .render import with_frame
from .rendering import check_frame_number, frame_work
from .security import READERS, guard
from .wado import items_for

router = APIRouter(tags=["viewer"])
FRAME = "/api/studies/{study}/series/{series}/instances/{sop}/frames/{frame}"
JSON = Offer("application/json")


def _target(request: Request, study: str, series: str, sop: str, frame: str) -> tuple[RetrieveItem, int]:
    """The instance and the frame number (1-based) a path names: 406 for an
    Accept without JSON, 400 for a frame that is not a number, 404 for an
    unknown instance or a frame it does not have."""
    negotiate(negotiation.effective_accept(request), [JSON], default=JSON)
    if not (frame.isascii() and frame.isdigit()) or len(frame) > 9:
        raise HTTPProblem(400, f"the frame number must be a positive integer, not {frame[:40]!r}")
    item = items_for(request, study, series, sop)[0]
    number = int(frame)
    check_frame_number(item, number)
    return item, number


def _measured(call: Any) -> Any:
    """``call()``, a :class:`measure.MeasureError` answered with its status (400, 422)."""
    try:
        return call()
    except measure.MeasureError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None


@router.get(FRAME + "/calibration", summary="How many mm a pixel of the frame is (measurements)")
def frame_calibration(request: Request, study: str, series: str, sop: str, frame: str,
                      _: Principal = guard(*READERS, action="retrieve")) -> dict[str, Any]:
    item, number = _target(request, study, series, sop, frame)
    with framelib.local_object(request.app.state.pacs, item) as path:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as exc:
            raise HTTPProblem(422, f"not a readable DICOM Part 10 object: {exc}") from None
    return _measured(lambda: measure.calibration(header, number - 1).as_json())


def _grid_limits(item: RetrieveItem) -> tuple[int, int] | None:
    """(columns, rows) as the index knows them; None when it does not."""
    return (item.columns, item.rows) if item.columns and item.rows else None


def _checked(values: dict[str, str | None], columns: int, rows: int, *, point: bool) -> dict[str, float]:
    """The coordinates, each from 0 to Columns (x) or Rows (y); a *point*'s
    below them (it names the pixel holding it)."""
    return {name: measure.coordinate(text, name, columns if name.startswith("x") else rows, below=point)
            for name, text in values.items()}


def _decoded(request: Request, item: RetrieveItem, number: int, coordinates: dict[str, str | None],
             work: Any, *, point: bool = False) -> Any:
    """``work(dataset, pixel, coordinates)`` on the frame decoded; the
    coordinates checked against the index's image size before decoding and
    against the object's own after."""
    limits = _grid_limits(item)
    if limits is not None:
        _measured(lambda: _checked(coordinates, *limits, point=point))
    else:  # not numbers at all: refused before any decoding
        _measured(lambda: _checked(coordinates, 2**31, 2**31, point=point))

    def use(ds: pydicom.Dataset, pixel: Any) -> Any:
        rows, columns = int(pixel.shape[0]), int(pixel.shape[1])
        return _measured(lambda: work(ds, pixel, _checked(coordinates, columns, rows, point=point)))

    def run(f: BinaryIO) -> Any:
        return with_frame(f, number - 1, use, hold=PIXELS.lease)

    return frame_work(request, item, run)


# Coordinates are taken as text and checked here (a 400 naming the
# parameter and the frame's range): a float parameter would take "nan" and "inf".
# One Query each: a Query shared by two parameters answered both with one value.
def _x() -> Any:
    return Query(None, description="x: 0 (left edge of the first column) to Columns")


def _y() -> Any:
    return Query(None, description="y: 0 (top edge of the first row) to Rows")


@router.get(FRAME + "/roi", summary="Statistics of a region of the frame in modality units (HU for CT)")
def frame_roi(request: Request, study: str, series: str, sop: str, frame: str,
              shape: str = Query("ellipse", description="ellipse (inscribed in the box) or rectangle"),
              x0: str | None = _x(), y0: str | None = _y(), x1: str | None = _x(), y1: str | None = _y(),
              _: Principal = guard(*READERS, action="retrieve")) -> dict[str, Any]:
    item, number = _target(request, study, series, sop, frame)
    if shape not in measure.SHAPES:
        raise HTTPProblem(400, f"shape must be one of {', '.join(measure.SHAPES)}, not {shape[:40]!r}")
    coordinates = {"x0": x0, "y0": y0, "x1": x1, "y1": y1}

    def work(ds: pydicom.Dataset, pixel: Any, at: dict[str, float]) -> dict[str, Any]:
        box = (at["x0"], at["y0"], at["x1"], at["y1"])
        return measure.roi_statistics(ds, pixel, number - 1, shape, box)

    return _decoded(request, item, number, coordinates, work)  # type: ignore[no-any-return]


@router.get(FRAME + "/pixel", summary="The value of one pixel of the frame, stored and in modality units")
def frame_pixel(request: Request, study: str, series: str, sop: str, frame: str,
                x: str | None = Query(None, description="x: 0 to below Columns"),
                y: str | None = Query(None, description="y: 0 to below Rows"),
                _: Principal = guard(*READERS, action="retrieve")) -> dict[str, Any]:
    item, number = _target(request, study, series, sop, frame)
    coordinates = {"x": x, "y": y}

    def work(ds: pydicom.Dataset, pixel: Any, at: dict[str, float]) -> dict[str, Any]:
        return measure.probe(ds, pixel, number - 1, at["x"], at["y"])

    return _decoded(request, item, number, coordinates, work, point=True)  # type: ignore[no-any-return]
