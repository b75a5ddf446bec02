"""Saved measurements and annotations over HTTP: every Grayscale Softcopy
Presentation State of a study (pacs.annotations), and a radiologist's own
measurements saved as one.

- ``GET /api/studies/{study}/annotations``: the reading roles (a referring
  physician: the studies they referred), audited as a ``view``.
- ``PUT /api/studies/{study}/annotations`` ``{"measurements": [{"sop_uid",
  "frame", "kind", "points", "label"}]}``: a radiologist's (or an
  administrator's) own measurements replace the ones they saved before;
  ``[]`` removes them. Audited as ``annotations-update``; each GSPS it
  replaces is deleted with an audited ``delete`` event of its own.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from pacs.annotations import MAX_LABEL, MAX_MEASUREMENTS, Drawn, replace_measurements, study_annotations
from pacs.audit import Event
from pacs.auth import Principal

from .errors import JsonBody, refused_as_problem, require_uids
from .key_images_api import author_of
from .security import READERS, guard

router = APIRouter(tags=["viewer"])


class DrawnMeasurement(JsonBody):
    sop_uid: str = Field(..., min_length=1, max_length=64, description="SOP Instance UID of an image of the study")
    frame: int = Field(1, ge=1, le=2**31 - 1, description="1-based frame (1 for a single-frame image)")
    kind: str = Field(..., max_length=16, description="length (2 points), angle (3, the vertex second) or roi "
                                                      "(2: the corners of the ellipse's box)")
    points: list[tuple[float, float]] = Field(..., max_length=8, description="[x, y] in the frame's pixel grid")
    label: str = Field("", max_length=MAX_LABEL, description='the value as shown, e.g. "32.0 mm"')
    window: tuple[float, float] | None = Field(
        None, description="[centre, width] of the window it was measured in (the state's Softcopy VOI LUT); "
                          "none: the image's own")


class Measurements(JsonBody):
    measurements: list[DrawnMeasurement] = Field(default_factory=list, max_length=MAX_MEASUREMENTS)


@router.get("/api/studies/{study}/annotations",
            summary="The study's measurements and annotations: every Grayscale Softcopy Presentation State in it "
                    "(graphics and texts per image and frame, in pixels)")
def get_annotations(request: Request, study: str,
                    principal: Principal = guard(*READERS, action="view")) -> dict[str, Any]:
    require_uids(study, name="Study Instance UID")
    return refused_as_problem(study_annotations, request.app.state.pacs, study, principal.username)  # type: ignore[no-any-return]


@router.put("/api/studies/{study}/annotations",
            summary="Save the caller's measurements of the study as a Grayscale Softcopy Presentation State "
                    "(replaces their previous one; an empty list removes it)")
def put_annotations(request: Request, study: str, body: Measurements,
                    principal: Principal = guard("radiologist", "admin", action="annotations-update")
                    ) -> dict[str, Any]:
    require_uids(study, name="Study Instance UID")
    author = author_of(request, principal)
    drawn = [Drawn(m.sop_uid, m.frame, m.kind, tuple((float(x), float(y)) for x, y in m.points), m.label,
                   (float(m.window[0]), float(m.window[1])) if m.window is not None else None)
             for m in body.measurements]
    answer = refused_as_problem(replace_measurements, request.app.state.pacs, study, drawn, author)
    event = getattr(request.state, "audit", None)
    if isinstance(event, Event):
        what = (f"{len(drawn)} measurement(s) in {', '.join(answer['states_saved'])}" if answer["states_saved"]
                else "measurements removed")
        if answer["removed"]:
            what += f"; replaced {', '.join(answer['removed'])}"
        event.detail = f"{event.detail}: {what}"[:500]
    return answer  # type: ignore[no-any-return]
