"""Media types and Accept-header negotiation for DICOMweb (DICOM PS3.18).

Route code describes what it can produce as a list of :class:`Offer` and asks
:func:`negotiate` which one to send::

    accept = accept_from_request(request.headers.get("accept"),
                                 request.query_params.getlist("accept"))
    chosen = negotiate(accept, instance_offers(stored_ts), default=INSTANCE_DEFAULT)
    # chosen.transfer_syntax: "*" = send as stored, else the UID to produce

PS3.18 rules the matcher implements (section 8.7):

* ``multipart/related; type="application/dicom"`` without ``transfer-syntax``
  means the default transfer syntax of the part type (Explicit VR Little
  Endian for instances and uncompressed bulk data, Table 8.7.3-5 for
  compressed bulk data); ``transfer-syntax=*`` means "any, as stored".
* A bare part type (``application/dicom``, ``image/jpeg``...) in Accept matches
  the corresponding ``multipart/related`` offer: clients often send it.
* ``*/*`` prefers the default transfer syntax but, as it accepts anything,
  may fall back to any offer.
* q-values per RFC 9110: the most specific matching range sets an offer's q,
  q=0 excludes it; ties go to wildcards last, then to the client's order,
  then to the closest parameter match, then to the server's order.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "INSTANCE_DEFAULT",
    "METADATA_DEFAULT",
    "METADATA_OFFERS",
    "RENDERED_DEFAULT",
    "RENDERED_OFFERS",
    "MediaRange",
    "NotAcceptable",
    "Offer",
    "accept_from_request",
    "canonical_media_type",
    "choose",
    "default_transfer_syntax",
    "format_media_type",
    "frame_offers",
    "instance_offers",
    "media_type_for_transfer_syntax",
    "negotiate",
    "parse_accept",
    "parse_media_type",
    "transfer_syntaxes_of",
    "video_media_types",
]

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
MULTIPART_RELATED = "multipart/related"

# RFC 9110 token characters; also used for parameter names.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Lenient qvalue: RFC 9110 allows at most 3 decimals, clients send more.
_QVALUE_RE = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)")

# PS3.18 Table 8.7.3-5 (2024) plus uncompressed bulk data (Table 8.7.3-4) and
# instances (Table 8.7.3-2): part media type -> transfer syntaxes it can carry,
# the RESTful default first.  Read-only so it cannot become shared mutable state.
_TRANSFER_SYNTAXES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "application/dicom": (EXPLICIT_VR_LITTLE_ENDIAN,),
    "application/octet-stream": (EXPLICIT_VR_LITTLE_ENDIAN,),
    "image/jpeg": ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.50",
                   "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57"),
    "image/dicom-rle": ("1.2.840.10008.1.2.5",),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/jphc": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                   "1.2.840.10008.1.2.4.203"),
    "image/jxl": ("1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.111",
                  "1.2.840.10008.1.2.4.112"),
    "video/mpeg": ("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.100.1",
                   "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.101.1"),
    "video/mp4": ("1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.102.1",
                  "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.103.1",
                  "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.104.1",
                  "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.105.1",
                  "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.106.1",
                  "1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108"),
    "video/h265": ("1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108"),
})

# Spellings from older PS3.18 editions that dcm4che, Orthanc and
# dicomweb-client still send; matching compares canonical forms.
_ALIASES: Mapping[str, str] = MappingProxyType({
    "image/x-jls": "image/jls",
    "image/x-dicom-rle": "image/dicom-rle",
    "image/jhc": "image/jphc",
    "video/mpeg2": "video/mpeg",
})

# Transfer syntaxes whose pixel data is native (not encapsulated): frames of
# these are served as application/octet-stream.
_UNCOMPRESSED = frozenset({
    "1.2.840.10008.1.2", EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
})

# RFC 6839 structured-syntax suffixes: a '+' in a query string that was not
# percent-encoded arrives as a space ("application/dicom json").
_SUFFIX_SPACE_RE = re.compile(
    r"(?<=[A-Za-z0-9.-]) (json|xml|zip|gzip|cbor|der|ber|fastinfoset|wbxml|jwt|yaml|zstd|sqlite3|tlv)\b"
)


# -- parsing ------------------------------------------------------------------------
def _split_unquoted(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside RFC 9110 quoted strings.

    An unterminated quote swallows the rest of ``text`` into the last piece,
    which then fails to parse: that is the only safe reading of it.
    """
    if '"' not in text:
        return text.split(sep)
    pieces: list[str] = []
    start = 0
    in_quote = False
    escaped = False
    for i, ch in enumerate(text):
        if in_quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
        elif ch == sep:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return pieces


def _unquote(value: str) -> str | None:
    """The value of a token or quoted-string parameter; None when malformed."""
    if value.startswith('"'):
        if len(value) < 2 or not value.endswith('"'):
            return None
        inner = value[1:-1]
        out: list[str] = []
        i = 0
        while i < len(inner):
            ch = inner[i]
            if ch == "\\":
                if i + 1 == len(inner):
                    return None  # the closing quote was escaped
                out.append(inner[i + 1])
                i += 2
                continue
            if ch == '"':
                return None
            out.append(ch)
            i += 1
        return "".join(out)
    # Unquoted values should be tokens, but clients send type=application/dicom
    # unquoted ('/' is not a token character); accept anything without
    # whitespace or quotes.
    if not value or any(c in value for c in ' \t"'):
        return None
    return value


def parse_media_type(value: str, *, strict: bool = False) -> tuple[str, dict[str, str]] | None:
    """Parse ``type/subtype; name=value; ...`` (Content-Type or one Accept entry).

    Returns ``("type/subtype", params)`` with the media type lowercased,
    parameter names lowercased and parameter values unquoted but otherwise
    unchanged (a boundary is case-sensitive).  A malformed type/subtype gives
    None; a malformed parameter is skipped, or gives None when ``strict``.
    Empty parameters (``image/png;``) are always ignored.  A bare ``*`` (sent
    by Java's HttpURLConnection) reads as ``*/*``.
    """
    pieces = _split_unquoted(value, ";")
    mtype = pieces[0].strip().lower()
    if mtype == "*":
        mtype = "*/*"
    main, slash, sub = mtype.partition("/")
    if not slash or not _TOKEN_RE.fullmatch(main) or not _TOKEN_RE.fullmatch(sub):
        return None
    if main == "*" and sub != "*":
        return None
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        if not piece.strip():
            continue
        name, eq, raw = piece.partition("=")
        name = name.strip().lower()
        parsed = _unquote(raw.strip()) if eq and _TOKEN_RE.fullmatch(name) else None
        if parsed is None:
            if strict:
                return None
            continue
        params.setdefault(name, parsed)  # first occurrence wins, like most parsers
    return mtype, params


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One entry of an Accept header.

    ``type``/``subtype`` are lowercased (``*`` for wildcards); ``params`` holds
    the media-type parameters (``type``, ``transfer-syntax``, ``charset``...)
    with lowercased names, without ``q``.
    """

    type: str
    subtype: str
    params: dict[str, str] = field(default_factory=dict, hash=False)
    q: float = 1.0

    @property
    def media_type(self) -> str:
        """``type/subtype``."""
        return f"{self.type}/{self.subtype}"

    def __str__(self) -> str:
        text = format_media_type(self.media_type, self.params)
        return text if self.q == 1.0 else f"{text}; q={self.q:g}"


def parse_accept(header: str | None) -> list[MediaRange]:
    """Parse an Accept header value into media ranges, in header order.

    Malformed entries (bad type/subtype, malformed parameter, bad or
    out-of-range q) are dropped; this never raises on any string.  ``q`` is taken wherever it appears among
    the parameters: DICOMweb clients do not use RFC 9110 accept-extensions, but
    some put ``q`` before ``type``/``transfer-syntax``.
    """
    if not header:
        return []
    ranges: list[MediaRange] = []
    for entry in _split_unquoted(header, ","):
        if not entry.strip():
            continue
        parsed = parse_media_type(entry, strict=True)
        if parsed is None:
            continue
        mtype, params = parsed
        q = 1.0
        if "q" in params:
            raw_q = params.pop("q").strip()
            if not _QVALUE_RE.fullmatch(raw_q):
                continue
            q = float(raw_q)
            if not 0.0 <= q <= 1.0:
                continue
        main, _, sub = mtype.partition("/")
        ranges.append(MediaRange(main, sub, params, q))
    return ranges


def format_media_type(media_type: str, params: Mapping[str, str] | None = None) -> str:
    """``media_type; name=value...``, quoting values that are not tokens.

    ``type`` is always quoted because PS3.18 examples do and some DICOMweb
    clients only look for the quoted form.
    """
    out = [media_type]
    for name, value in (params or {}).items():
        if name == "type" or not _TOKEN_RE.fullmatch(value):
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{name}={value}")
    return "; ".join(out)


# -- PS3.18 tables ---------------------------------------------------------------
def canonical_media_type(media_type: str) -> str:
    """The PS3.18 spelling of a media type without parameters, lowercased
    (``image/x-jls`` -> ``image/jls``)."""
    mt = media_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(mt, mt)


def default_transfer_syntax(part_type: str) -> str | None:
    """The transfer syntax PS3.18 implies when a request names ``part_type``
    (``application/dicom``, ``image/jpeg``...) without ``transfer-syntax``;
    None for types without transfer syntax (JSON, rendered images)."""
    syntaxes = _TRANSFER_SYNTAXES.get(canonical_media_type(part_type))
    return syntaxes[0] if syntaxes else None


def transfer_syntaxes_of(part_type: str) -> tuple[str, ...]:
    """The transfer syntaxes PS3.18 Table 8.7.3-5 lists for *part_type*."""
    return _TRANSFER_SYNTAXES.get(canonical_media_type(part_type), ())


def media_type_for_transfer_syntax(uid: str) -> str | None:
    """The bulk-data media type for frames stored in ``uid``
    (``application/octet-stream`` for native pixel data); None if unknown."""
    uid = uid.strip()
    if uid in _UNCOMPRESSED:
        return "application/octet-stream"
    for media_type, syntaxes in _TRANSFER_SYNTAXES.items():
        if media_type not in ("application/dicom", "application/octet-stream") and uid in syntaxes:
            return media_type
    return None


# PS3.18's spelling of the video types (media types compare case-insensitively;
# the table above keeps them lowercased, as Offer does).
_VIDEO_SPELLING: Mapping[str, str] = MappingProxyType({"video/h265": "video/H265"})


def video_media_types(uid: str) -> tuple[str, ...]:
    """The media types of the whole stream of a video stored in ``uid``
    (PS3.18 Table 8.7.3-5: ``video/mpeg`` for MPEG-2, ``video/mp4`` for
    MPEG-4 AVC/H.264, ``video/H265`` and ``video/mp4`` for HEVC), the
    stream's own type first (the one listing fewest syntaxes); empty for
    anything but video, whose pixel data is frames, not one stream."""
    uid = uid.strip()
    found = [t for t, syntaxes in _TRANSFER_SYNTAXES.items() if t.startswith("video/") and uid in syntaxes]
    return tuple(_VIDEO_SPELLING.get(t, t) for t in sorted(found, key=lambda t: len(_TRANSFER_SYNTAXES[t])))


# -- offers and matching ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Offer:
    """A representation the server can produce.

    ``media_type``: the response media type (``multipart/related``,
    ``application/dicom+json``, ``image/png``...).
    ``type_param``: for ``multipart/related``, the media type of the parts
    (the ``type`` parameter): ``application/dicom``, ``application/octet-stream``,
    ``image/jpeg``...
    ``transfer_syntax``: None when not applicable (JSON, rendered); ``"*"`` for
    "as stored"; else the UID the server will produce.
    ``substitutes_default``: set when PS3.18 lets this offer stand in for the
    default transfer syntax of a request that named the part type without
    ``transfer-syntax`` (pixel data only available lossy or too large for
    Explicit VR Little Endian, PS3.18 8.7.3.3); it ranks below a real default.
    """

    media_type: str
    type_param: str | None = None
    transfer_syntax: str | None = None
    substitutes_default: bool = False

    def __post_init__(self) -> None:
        # Normalise once so matching compares plain strings.
        object.__setattr__(self, "media_type", self.media_type.strip().lower())
        if self.type_param is not None:
            if not self.media_type.startswith("multipart/"):
                raise ValueError("type_param only applies to multipart media types")
            object.__setattr__(self, "type_param", self.type_param.strip().lower())
        if self.transfer_syntax is not None:
            object.__setattr__(self, "transfer_syntax", self.transfer_syntax.strip())

    @property
    def is_multipart(self) -> bool:
        """True for ``multipart/*`` offers."""
        return self.media_type.startswith("multipart/")

    @property
    def part_type(self) -> str:
        """The media type of each part (multipart) or of the whole body."""
        return self.type_param or self.media_type

    def params(self) -> dict[str, str]:
        """The media-type parameters describing this offer (no boundary)."""
        params: dict[str, str] = {}
        if self.type_param:
            params["type"] = self.type_param
        if self.transfer_syntax:
            params["transfer-syntax"] = self.transfer_syntax
        return params

    def __str__(self) -> str:
        return format_media_type(self.media_type, self.params())


def _media_level(r: MediaRange) -> int:
    """0 for ``*/*``, 1 for ``type/*``, 2 for a concrete type."""
    if r.type == "*":
        return 0
    return 1 if r.subtype == "*" else 2


def _match(r: MediaRange, o: Offer, *, refusal: bool = False) -> int | None:
    """Specificity of the match of range ``r`` on offer ``o``; None if no match.

    Digits, most significant first: how the media type matched (0 ``*/*``,
    1 ``type/*``, 2 bare part type, 3 exact), whether the part type was named,
    and how the transfer syntax matched (0 wildcard or substitute, 1 ``*``
    against a concrete syntax, 2 exact or the implied default).

    ``refusal`` (q=0 ranges): ``application/dicom;q=0`` refuses DICOM in every
    transfer syntax, as RFC 9110 reads a range without a parameter, rather
    than only the implied default one.
    """
    r_type = r.params.get("type")
    main = o.media_type.partition("/")[0]
    bare_part = False
    if r.type == "*":
        media = 0
    elif r.subtype == "*":
        if r.type != main:
            return None
        media = 1
    elif r.media_type == o.media_type:
        media = 3
    elif (o.is_multipart and o.type_param and r_type is None
          and canonical_media_type(r.media_type) == canonical_media_type(o.type_param)):
        media, bare_part = 2, True
    else:
        return None

    named_part = bare_part
    if r_type is not None and r_type.strip() in ("*/*", "*"):
        # type="*/*" (sent by dicomweb-client for frames): any part type.
        r_type = None
    if o.is_multipart and o.type_param and not bare_part and r_type is not None:
        if canonical_media_type(r_type) != canonical_media_type(o.type_param):
            return None
        named_part = True
    elif not o.is_multipart and not bare_part:
        # A single-part offer is its own part type: application/dicom names it.
        named_part = media == 3

    ts_level = 0
    if o.transfer_syntax is not None:
        r_ts = r.params.get("transfer-syntax", "").strip()
        if r_ts == "*":
            ts_level = 2 if o.transfer_syntax == "*" else 1
        elif r_ts:
            if r_ts != o.transfer_syntax:
                return None
            ts_level = 2
        elif o.transfer_syntax == default_transfer_syntax(o.part_type):
            ts_level = 2
        elif named_part and not o.substitutes_default and not refusal:
            # PS3.18 8.7.3: naming the part type without transfer-syntax asks
            # for the default syntax; anything else would surprise the client.
            return None
    return media * 100 + (10 if named_part else 0) + ts_level


def choose(accept: Sequence[MediaRange], offers: Sequence[Offer]) -> Offer | None:
    """The best offer for the client's ranges, or None if none is acceptable.

    Per offer, the most specific matching range (first in the header on a
    tie) gives its q; q=0 excludes the offer.  Among acceptable offers the
    winner has the highest q, then was matched by a concrete type rather
    than a wildcard, then by the earliest range in the client's list, then
    most specifically, then comes first in ``offers`` (server preference).
    """
    best: tuple[tuple[float, int, int, int, int], Offer] | None = None
    for o_idx, offer in enumerate(offers):
        governing: tuple[int, int, MediaRange] | None = None  # (spec, -idx, range)
        for r_idx, r in enumerate(accept):
            spec = _match(r, offer, refusal=r.q <= 0.0)
            if spec is not None and (governing is None or (spec, -r_idx) > governing[:2]):
                governing = (spec, -r_idx, r)
        if governing is None:
            continue
        spec, neg_idx, r = governing
        if r.q <= 0.0:
            continue
        key = (r.q, _media_level(r), neg_idx, spec, -o_idx)
        if best is None or key > best[0]:
            best = (key, offer)
    return best[1] if best else None


class NotAcceptable(Exception):
    """No offer matches the Accept header: answer 406 with :attr:`acceptable`."""

    http_status = 406

    def __init__(self, accept: str | None, acceptable: Sequence[Offer]) -> None:
        self.accept = accept
        self.acceptable: tuple[str, ...] = tuple(dict.fromkeys(str(o) for o in acceptable))
        shown = accept if accept is None or len(accept) <= 200 else accept[:200] + "..."
        super().__init__(
            f"none of the requested media types ({shown!r}) can be produced for this "
            f"resource; acceptable media types: {', '.join(self.acceptable)}"
        )


def negotiate(accept_header: str | None, offers: Sequence[Offer], *, default: Offer,
              fallback_to_default: bool = False) -> Offer:
    """Pick the offer to produce for ``accept_header``.

    ``default`` is the server's first preference: returned when the header is
    missing (or holds nothing parseable) and preferred when the client accepts
    several offers equally (``*/*``).  It need not be repeated in ``offers``.
    Raises :class:`NotAcceptable` when nothing matches, unless
    ``fallback_to_default`` (PS3.18 Table 8.7.3-1 lets an origin server answer
    with the default media type instead of 406).
    """
    candidates = [default, *(o for o in offers if o != default)]
    ranges = parse_accept(accept_header)
    if not ranges:
        return default
    chosen = choose(ranges, candidates)
    if chosen is not None:
        return chosen
    if fallback_to_default:
        return default
    raise NotAcceptable(accept_header, candidates)


def accept_from_request(header: str | None, query_accept: str | Sequence[str] | None) -> str | None:
    """The effective Accept value: the PS3.18 8.3.3.1 ``accept`` query
    parameter when present (it overrides the header), else the header.

    ``query_accept`` is what the framework decoded (one value or the list from
    ``request.query_params.getlist("accept")``).  Values still holding
    percent-escapes are decoded once more, and a ``+`` that arrived as a space
    (``application/dicom json``) is repaired.
    """
    if isinstance(query_accept, str):
        values: Iterable[str] = [query_accept]
    else:
        values = query_accept or []
    cleaned: list[str] = []
    for value in values:
        value = value.strip()
        if "%" in value:
            # Media types never contain '%', so this is a second encoding layer.
            value = urllib.parse.unquote(value)
        value = _SUFFIX_SPACE_RE.sub(r"+\1", value)
        if value:
            cleaned.append(value)
    if cleaned:
        return ", ".join(cleaned)
    return header


# -- ready-made offers for the DICOMweb resources --------------------------------
METADATA_DEFAULT = Offer("application/dicom+json")
METADATA_OFFERS: tuple[Offer, ...] = (METADATA_DEFAULT, Offer("application/json"))
RENDERED_DEFAULT = Offer("image/jpeg")
RENDERED_OFFERS: tuple[Offer, ...] = (RENDERED_DEFAULT, Offer("image/png"), Offer("image/gif"))
INSTANCE_DEFAULT = Offer(MULTIPART_RELATED, "application/dicom", EXPLICIT_VR_LITTLE_ENDIAN)


def instance_offers(stored_transfer_syntax: str | None = None, *,
                    can_transcode_to_default: bool = True) -> list[Offer]:
    """Offers for WADO-RS instance retrieval (``multipart/related;
    type="application/dicom"``).

    ``stored_transfer_syntax``: the syntax every requested instance is stored
    in, or None when mixed/unknown.  ``can_transcode_to_default``: False when
    the pixel data cannot (or, being lossy, should not) be decoded to Explicit
    VR Little Endian; the as-stored offers then substitute for the default as
    PS3.18 8.7.3.3 allows.  The first offer is the one to pass as
    ``default=`` to :func:`negotiate`.
    """
    substitute = not can_transcode_to_default
    offers: list[Offer] = []
    if can_transcode_to_default:
        offers.append(INSTANCE_DEFAULT)
    stored = (stored_transfer_syntax or "").strip()
    if stored and stored != EXPLICIT_VR_LITTLE_ENDIAN:
        offers.append(Offer(MULTIPART_RELATED, "application/dicom", stored,
                            substitutes_default=substitute))
    offers.append(Offer(MULTIPART_RELATED, "application/dicom", "*", substitutes_default=substitute))
    return offers


def frame_offers(stored_transfer_syntax: str, *, can_decode: bool = True) -> list[Offer]:
    """Offers for frames and pixel bulk data stored in ``stored_transfer_syntax``.

    Uncompressed ``application/octet-stream`` (the default) when the frames are
    native or ``can_decode``; the stored compressed media type with its
    transfer syntax; and ``application/octet-stream; transfer-syntax=*`` for
    "as stored" (the parts then carry their real media type).  The first
    offer is the one to pass as ``default=`` to :func:`negotiate`.
    """
    stored = stored_transfer_syntax.strip()
    native = stored in _UNCOMPRESSED
    octet_default = Offer(MULTIPART_RELATED, "application/octet-stream", EXPLICIT_VR_LITTLE_ENDIAN)
    offers: list[Offer] = []
    if native or can_decode:
        offers.append(octet_default)
    compressed = None if native else media_type_for_transfer_syntax(stored)
    if compressed is not None:
        # Requests for e.g. type="image/jpeg" imply the lossless default
        # (.4.70); serving the stored baseline instead is what every archive
        # does and what the client can decode, so let it substitute.
        offers.append(Offer(MULTIPART_RELATED, compressed, stored, substitutes_default=True))
    offers.append(Offer(MULTIPART_RELATED, "application/octet-stream", "*",
                        substitutes_default=not (native or can_decode)))
    return offers
