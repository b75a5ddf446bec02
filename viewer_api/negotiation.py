"""What each DICOMweb resource can produce, negotiated against the client's
Accept header (or ``accept=`` query parameter) with :mod:`mediatypes`."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Request
from pydicom.uid import AllTransferSyntaxes

from pacs.retrieve import RetrieveItem
from pacs.transcode import ENCODABLE, UNCOMPRESSED, can_serve

from . import mediatypes
from .mediatypes import MULTIPART_RELATED, Offer


def effective_accept(request: Request) -> str | None:
    """The Accept the client means: the ``accept`` query parameter or the header."""
    return mediatypes.accept_from_request(
        request.headers.get("accept"), request.query_params.getlist("accept") or None
    )


def negotiate_instances(request: Request, items: Sequence[RetrieveItem] | None = None) -> Offer:
    """Instances: as stored (``transfer-syntax=*``), the default Explicit VR
    Little Endian, any syntax we can convert to, and the syntax they are
    stored in (a JPEG Baseline object asked for in JPEG Baseline is sent
    as is, not refused).

    With *items*, a syntax is offered when every instance is stored in it or
    can be converted to it (:func:`pacs.transcode.can_serve`), so a 406
    lists exactly what can be had. Without, every transfer syntax is offered
    and the caller checks each instance with ``can_serve`` (a 406 then)."""
    offers = mediatypes.instance_offers(None)
    candidates = {str(t) for t in (*UNCOMPRESSED, *ENCODABLE)}
    if items is None:
        candidates |= {str(t) for t in AllTransferSyntaxes}
    else:
        candidates |= {i.transfer_syntax_uid for i in items}
        candidates = {ts for ts in candidates if all(can_serve(i, ts) for i in items)}
    for ts in sorted(candidates):
        offers.append(Offer(MULTIPART_RELATED, "application/dicom", ts))
    return mediatypes.negotiate(effective_accept(request), offers, default=mediatypes.INSTANCE_DEFAULT)


def negotiate_json(request: Request) -> Offer:
    return mediatypes.negotiate(
        effective_accept(request), list(mediatypes.METADATA_OFFERS), default=mediatypes.METADATA_DEFAULT
    )


def negotiate_frames(request: Request, stored_transfer_syntax: str) -> Offer:
    offers = mediatypes.frame_offers(stored_transfer_syntax)
    return mediatypes.negotiate(effective_accept(request), offers, default=offers[0])


def negotiate_bulk(request: Request) -> Offer:
    """A bulk data value other than Pixel Data (waveforms, overlays, an
    encapsulated document's bytes): ``multipart/related;
    type="application/octet-stream"`` only, as stored or in the default
    syntax (the same bytes); anything else is a 406, not octets under a
    type the client did not accept."""
    offers = [Offer(MULTIPART_RELATED, "application/octet-stream", mediatypes.EXPLICIT_VR_LITTLE_ENDIAN),
              Offer(MULTIPART_RELATED, "application/octet-stream", "*")]
    return mediatypes.negotiate(effective_accept(request), offers, default=offers[0])


def negotiate_rendered(request: Request) -> Offer:
    """The form of a rendered answer: an image, or (PS3.18's form of Accept
    for a series, a study, several frames) ``multipart/related;
    type="image/jpeg"``, which a single image may be asked in too."""
    offers = list(mediatypes.RENDERED_OFFERS)
    offers += [Offer(MULTIPART_RELATED, o.media_type) for o in mediatypes.RENDERED_OFFERS]
    return mediatypes.negotiate(effective_accept(request), offers, default=mediatypes.RENDERED_DEFAULT)


def negotiate_document(request: Request, media_type: str) -> Offer:
    """An encapsulated document's rendered form: its own media type only."""
    offer = Offer(media_type)
    return mediatypes.negotiate(effective_accept(request), [offer], default=offer)
