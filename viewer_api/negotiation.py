"""What each DICOMweb resource can produce, negotiated against the client's
Accept header (or ``accept=`` query parameter) with :mod:`mediatypes`."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Request
from pydicom.uid import AllTransferSyntaxes

from pacs.retrieve import RetrieveItem
from pacs.transcode import ENCODABLE, UNCOMPRESSED, can_serve, unservable_reason

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


# Syntaxes whose pixel data are (or may be) lossy compressed: JPEG Baseline
# and Extended, JPEG-LS near-lossless, JPEG 2000 and HTJ2K that allow loss,
# JPEG XL (and its recompression of a lossy JPEG), and every video syntax.
LOSSY_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203",
    "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112",
    *(ts for t in ("video/mpeg", "video/mp4", "video/h265") for ts in mediatypes.transfer_syntaxes_of(t)),
})


def sent_as_stored(request: Request, items: Sequence[RetrieveItem], target: str) -> set[str]:
    """SOP Instance UIDs of *items* that cannot be given in the negotiated
    *target* but are sent as stored instead, because the client accepts
    that for them: ``*/*`` or no Accept at all, ``transfer-syntax=*``, or
    the part type without a transfer syntax when their pixel data are lossy
    (PS3.18 8.7.3.4: the default syntax is implied, and lossy pixel data may
    be returned in their lossy syntax). A video in a study was a 406 for the
    whole study even to ``Accept: */*`` (dicomweb-client's retrieve_study).
    A syntax the client named (``transfer-syntax=1.2.840.10008.1.2.1``)
    is never replaced: those instances stay a 406."""
    if target == "*":
        return set()
    ranges = mediatypes.parse_accept(effective_accept(request))
    kept: set[str] = set()
    for item in items:
        if unservable_reason(item, target) is None:
            continue
        stored = Offer(MULTIPART_RELATED, "application/dicom", item.transfer_syntax_uid,
                       substitutes_default=item.transfer_syntax_uid in LOSSY_SYNTAXES)
        if not ranges or mediatypes.choose(ranges, [stored]) is not None:
            kept.add(item.sop_uid)
    return kept


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
