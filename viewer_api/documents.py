"""Encapsulated documents (PS3.3 A.45: PDF, CDA, STL, OBJ, MTL): the document
inside the DICOM object, for WADO-URI ``contentType=application/pdf`` and the
rendered resource of WADO-RS (PS3.18 8.7.4: a rendered encapsulated document
is the document itself).

The document's bytes and its MIMETypeOfEncapsulatedDocument come from
whichever modality sent the object: they are untrusted. Only types a browser
shows without running the document's script in our origin are served inline;
everything else is served so that a browser downloads it and, were it shown
anyway, runs nothing (:func:`document_response`).
"""

from __future__ import annotations

import re

from fastapi.responses import Response
from pydicom import dcmread

from pacs import frames as framelib
from pacs.app import Pacs
from pacs.retrieve import RetrieveItem

from .errors import HTTPProblem

# SOP Class -> the media type of its document (PS3.18 Table 8.7.4-1: text/xml
# is the rendered type of a text document such as CDA).
DOCUMENT_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.104.1": "application/pdf",
    "1.2.840.10008.5.1.4.1.1.104.2": "text/xml",  # CDA
    "1.2.840.10008.5.1.4.1.1.104.3": "model/stl",
    "1.2.840.10008.5.1.4.1.1.104.4": "model/obj",
    "1.2.840.10008.5.1.4.1.1.104.5": "model/mtl",
}
# Shown in the browser (the viewer's "open PDF" link): a browser's PDF viewer
# runs no script in our origin. Nothing here can carry HTML or SVG.
INLINE_TYPES = frozenset({"application/pdf"})
# The types a stored document is served as; any other stored
# MIMETypeOfEncapsulatedDocument (text/html, image/svg+xml, junk) is served
# as application/octet-stream: it is none of the documents DICOM defines.
KNOWN_TYPES = frozenset(DOCUMENT_CLASSES.values())
# Even if a browser were to show an attachment (or a client embeds it),
# the document runs no script, loads nothing and has no origin of ours.
ATTACHMENT_CSP = "sandbox; default-src 'none'"
_TOKEN = re.compile(r"^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+$")
_EXTENSIONS = {"application/pdf": "pdf", "text/xml": "xml", "model/stl": "stl", "model/obj": "obj",
               "model/mtl": "mtl"}


def document_media_type(item: RetrieveItem) -> str | None:
    """The media type of the document *item* encapsulates; None if it is not
    an encapsulated document (decided from the index, no object read)."""
    return DOCUMENT_CLASSES.get(item.sop_class_uid)


def _served_type(stored: str, item: RetrieveItem) -> str:
    """The type a document is served as: its stored
    MIMETypeOfEncapsulatedDocument (without parameters) when it is one of
    the document types DICOM defines, else application/octet-stream."""
    media_type = stored.split(";")[0].strip().lower() or (document_media_type(item) or "")
    if not _TOKEN.match(media_type) or media_type not in KNOWN_TYPES:
        return "application/octet-stream"
    return media_type


def document_bytes(pacs: Pacs, item: RetrieveItem) -> tuple[str, bytes]:
    """(media type to serve it as, document bytes) of an encapsulated
    document, without the pad byte DICOM adds to an odd length
    (EncapsulatedDocumentLength)."""
    with framelib.local_object(pacs, item) as path:
        ds = dcmread(path)
    if "EncapsulatedDocument" not in ds:
        raise HTTPProblem(404, f"instance {item.sop_uid} holds no encapsulated document")
    data = bytes(ds.EncapsulatedDocument)
    length = int(ds.get("EncapsulatedDocumentLength", 0) or 0)
    if 0 < length <= len(data):
        data = data[:length]
    return _served_type(str(ds.get("MIMETypeOfEncapsulatedDocument", "") or ""), item), data


def document_response(pacs: Pacs, item: RetrieveItem) -> Response:
    """The document of *item* as an HTTP answer: inline for a type in
    :data:`INLINE_TYPES`, otherwise an attachment in a CSP sandbox, so that
    a document a modality sent (HTML, XHTML inside a CDA) never runs script
    with the session of whoever opens it."""
    media_type, data = document_bytes(pacs, item)
    name = f"{item.sop_uid}.{_EXTENSIONS.get(media_type, 'bin')}"  # a UID: digits and dots only
    headers = {"X-Content-Type-Options": "nosniff"}
    if media_type in INLINE_TYPES:
        headers["Content-Disposition"] = f'inline; filename="{name}"'
    else:
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
        headers["Content-Security-Policy"] = ATTACHMENT_CSP
    return Response(data, media_type=media_type, headers=headers)
