"""Encapsulated documents (PS3.3 A.45: PDF, CDA, STL, OBJ, MTL): the document
inside the DICOM object, for WADO-URI ``contentType=application/pdf`` and the
rendered resource of WADO-RS (PS3.18 8.7.4: a rendered encapsulated document
is the document itself)."""

from __future__ import annotations

from pydicom import dcmread

from pacs import frames as framelib
from pacs.app import Pacs
from pacs.retrieve import RetrieveItem

from .errors import HTTPProblem

# SOP Class -> the media type of its document (PS3.18 Table 8.7.4-1);
# MIMETypeOfEncapsulatedDocument in the object wins when present.
DOCUMENT_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.104.1": "application/pdf",
    "1.2.840.10008.5.1.4.1.1.104.2": "text/xml",  # CDA
    "1.2.840.10008.5.1.4.1.1.104.3": "model/stl",
    "1.2.840.10008.5.1.4.1.1.104.4": "model/obj",
    "1.2.840.10008.5.1.4.1.1.104.5": "model/mtl",
}


def document_media_type(item: RetrieveItem) -> str | None:
    """The media type of the document *item* encapsulates; None if it is not
    an encapsulated document (decided from the index, no object read)."""
    return DOCUMENT_CLASSES.get(item.sop_class_uid)


def document_bytes(pacs: Pacs, item: RetrieveItem) -> tuple[str, bytes]:
    """(media type, document bytes) of an encapsulated document, without the
    pad byte DICOM adds to an odd length (EncapsulatedDocumentLength)."""
    with framelib.local_object(pacs, item) as path:
        ds = dcmread(path)
    if "EncapsulatedDocument" not in ds:
        raise HTTPProblem(404, f"instance {item.sop_uid} holds no encapsulated document")
    data = bytes(ds.EncapsulatedDocument)
    length = int(ds.get("EncapsulatedDocumentLength", 0) or 0)
    if 0 < length <= len(data):
        data = data[:length]
    media_type = str(ds.get("MIMETypeOfEncapsulatedDocument", "") or "") or document_media_type(item)
    return (media_type or "application/octet-stream").strip().lower(), data
