"""Key images (ảnh chính) over HTTP: the images of a study its Key Object
Selection documents select (pacs.key_images), and a radiologist's own
selection saved as one.

- ``GET /api/studies/{study}/key-images``: the reading roles (a referring
  physician: the studies they referred), audited as a ``view``.
- ``PUT /api/studies/{study}/key-images`` ``{"images": [{"sop_uid", "frame"}],
  "title", "description"}``: a radiologist's (or an administrator's) own
  selection replaces the one they saved before; ``images: []`` removes it.
  Audited as ``key-images-update``; each KOS it replaces is deleted with an
  audited ``delete`` event of its own.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from pacs.audit import Event
from pacs.auth import Principal
from pacs.key_images import (
    MAX_DESCRIPTION,
    MAX_MARKS,
    Author,
    Mark,
    replace_selection,
    study_key_images,
)

from .errors import JsonBody, refused_as_problem, require_uids
from .security import READERS, guard

router = APIRouter(tags=["viewer"])


class KeyImageMark(JsonBody):
    sop_uid: str = Field(..., min_length=1, max_length=64, description="SOP Instance UID of an image of the study")
    frame: int | None = Field(None, ge=1, le=2**31 - 1, description="1-based frame of a multi-frame image; "
                                                                      "absent: the whole instance")


class KeyImageSelection(JsonBody):
    images: list[KeyImageMark] = Field(default_factory=list, max_length=MAX_MARKS)
    title: str | None = Field(None, max_length=80, description='CID 7010 code or meaning; default "Of Interest"')
    description: str | None = Field(None, max_length=MAX_DESCRIPTION, description="Key Object Description text")


def author_of(request: Request, principal: Principal) -> Author:
    """The caller as the author of a document the viewer saves (key images, measurements)."""
    return Author(username=principal.username, display_name=principal.display_name, role=principal.role,
                  client=request.client.host if request.client else "")


@router.get("/api/studies/{study}/key-images",
            summary="The study's key images: every Key Object Selection in it (sop, series, frame, which KOS, "
                    "title, author)")
def get_key_images(request: Request, study: str,
                   principal: Principal = guard(*READERS, action="view")) -> dict[str, Any]:
    require_uids(study, name="Study Instance UID")
    return refused_as_problem(study_key_images, request.app.state.pacs, study, principal.username)  # type: ignore[no-any-return]


@router.put("/api/studies/{study}/key-images",
            summary="Save the caller's key images of the study as a Key Object Selection (replaces their previous "
                    "one; an empty list removes it)")
def put_key_images(request: Request, study: str, body: KeyImageSelection,
                   principal: Principal = guard("radiologist", "admin", action="key-images-update")) -> dict[str, Any]:
    require_uids(study, name="Study Instance UID")
    author = author_of(request, principal)
    answer = refused_as_problem(replace_selection, request.app.state.pacs, study,
                   [Mark(m.sop_uid, m.frame) for m in body.images], author,
                   title=body.title, description=body.description)
    event = getattr(request.state, "audit", None)
    if isinstance(event, Event):
        what = (f"{len(body.images)} key image(s) in {answer['document']}" if answer["document"]
                else "key images removed")
        if answer["removed"]:
            what += f"; replaced {', '.join(answer['removed'])}"
        event.detail = f"{event.detail}: {what}"[:500]
    return answer  # type: ignore[no-any-return]
