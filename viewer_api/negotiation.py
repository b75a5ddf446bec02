"""What each DICOMweb resource can produce, negotiated against the client's
Accept header (or ``accept=`` query parameter) with :mod:`mediatypes`."""

from __future__ import annotations

from fastapi import Request

from pacs.transcode import ENCODABLE, UNCOMPRESSED

from . import mediatypes
from .mediatypes import MULTIPART_RELATED, Offer


def effective_accept(request: Request) -> str | None:
    """The Accept the client means: the ``accept`` query parameter or the header."""
    return mediatypes.accept_from_request(
        request.headers.get("accept"), request.query_params.getlist("accept") or None
    )


def negotiate_instances(request: Request) -> Offer:
    """Instances: as stored (``transfer-syntax=*``), the default Explicit VR
    Little Endian, or any syntax we can convert to."""
    offers = mediatypes.instance_offers(None)
    for ts in sorted(str(t) for t in (*UNCOMPRESSED, *ENCODABLE)):
        offers.append(Offer(MULTIPART_RELATED, "application/dicom", ts))
    return mediatypes.negotiate(effective_accept(request), offers, default=mediatypes.INSTANCE_DEFAULT)


def negotiate_json(request: Request) -> Offer:
    return mediatypes.negotiate(
        effective_accept(request), list(mediatypes.METADATA_OFFERS), default=mediatypes.METADATA_DEFAULT
    )


def negotiate_frames(request: Request, stored_transfer_syntax: str) -> Offer:
    offers = mediatypes.frame_offers(stored_transfer_syntax)
    return mediatypes.negotiate(effective_accept(request), offers, default=offers[0])


def negotiate_rendered(request: Request) -> str:
    offer = mediatypes.negotiate(
        effective_accept(request), list(mediatypes.RENDERED_OFFERS), default=mediatypes.RENDERED_DEFAULT
    )
    return offer.media_type


def negotiate_document(request: Request, media_type: str) -> Offer:
    """An encapsulated document's rendered form: its own media type only."""
    offer = Offer(media_type)
    return mediatypes.negotiate(effective_accept(request), [offer], default=offer)
