"""Settings: defaults < config file (TOML) < ``PACS_*`` environment < command line.

The config file is ``--config FILE``, else ``$PACS_CONFIG``, else
``DATA_DIR/pacs.toml`` when it exists. Keys are the field names below
(``dicom_port = 104``); known AEs may be listed as ``[[ae]]`` tables with
``title``, ``host`` and ``port`` and are loaded into the AE registry.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import os
import socket
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


def _read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    with path.open("rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            # "Invalid value (at line 1, column 14)" named no file: which of
            # --config, $PACS_CONFIG or DATA_DIR/pacs.toml was read?
            raise ValueError(f"config file {path}: {exc}") from None


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the TOML config file, located from the other sources."""

    def __init__(self, settings_cls: type[BaseSettings], init_kwargs: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        explicit = init_kwargs.get("config_file") or os.environ.get("PACS_CONFIG")
        if explicit:
            path: Path | None = Path(explicit)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
        else:
            data_dir = init_kwargs.get("data_dir") or os.environ.get("PACS_DATA_DIR") or "./data"
            path = Path(data_dir) / "pacs.toml"
        self._data = _read_config_file(path)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        fields = self.settings_cls.model_fields
        unknown = [k for k in self._data if k not in fields]
        if unknown:
            # A misspelt index_url would otherwise give a new, empty local
            # archive without a word: refuse, naming the key.
            raise ValueError("unknown setting(s) in the config file: "
                             + "; ".join(_unknown_key(k, list(fields)) for k in unknown))
        return dict(self._data)


def _unknown_key(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


# PACS_* variables that are read outside the settings (or by our own tools).
_OTHER_ENV = {"PACS_CONFIG", "PACS_ENV_FILE", "PACS_LEASE_TTL", "PACS_REPORT_FONT", "PACS_SUPERVISOR_PID", "PACS_WORKER_NUMBER",
              "PACS_BENCH_CACHE"}


def unknown_environment() -> list[str]:
    """``PACS_*`` variables that configure nothing (a typo such as
    PACS_AE_TITEL), each with the closest setting's variable."""
    known = [f"PACS_{name.upper()}" for name in Settings.model_fields]
    return [_unknown_key(name, known) for name in sorted(os.environ)
            if name.startswith("PACS_") and name not in _OTHER_ENV and name not in known]


class KnownAeEntry(BaseModel):
    """One ``[[ae]]`` table: a peer loaded into the AE registry at start."""

    # A misspelt key is an error at start, not a setting silently ignored.
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    description: str = ""
    tls: bool = False
    # What it may ask of us ("all" or a comma list: pacs ae add --services).
    services: str = "all"
    # A PEM file or SHA-256 fingerprint pinning its TLS client certificate (pacs ae add --client-cert).
    client_cert: str = ""
    # Its C-FIND and worklist answers: "utf-8", or "ascii" without diacritics (pacs ae add --charset).
    charset: Literal["utf-8", "ascii"] = "utf-8"

    @field_validator("services")
    @classmethod
    def _known_services(cls, value: str) -> str:
        from .aes import parse_services  # the registry imports the index: not at settings import

        parse_services(value)
        return value


class RouteEntry(BaseModel):
    """One ``[[route]]`` table: an auto-forward rule (see :func:`pacs.routing.load_rule`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, coerce_numbers_to_str=True)

    name: str = Field(min_length=1)
    conditions: list[str] = Field(default_factory=list, alias="if")
    to_ae: str | None = None
    to_url: str | None = None
    auth: str = ""
    transcode: str = ""
    deidentify: bool = False
    morph: dict[str, str] = Field(default_factory=dict, alias="set")
    stable_seconds: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_destination(self) -> RouteEntry:
        if (self.to_ae is None) == (self.to_url is None):
            raise ValueError(f"route {self.name!r}: give exactly one of to_ae and to_url")
        return self


class Settings(BaseSettings):
    """Everything an operator can configure."""

    model_config = SettingsConfigDict(env_prefix="PACS_", extra="ignore")

    config_file: Path | None = None
    data_dir: Path = Path("./data")
    index_url: str | None = None
    storage_url: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    # S3 store: bytes of objects kept on local disk for the reads that need a
    # local file (a frame of a multi-frame object, a video's byte ranges, a
    # render, a retrieval): without it each such read downloads the whole
    # object. Least recently used first out; each use checks the copy against
    # the store (one HEAD: a replaced or deleted object is never served from
    # it). 0: no cache. The filesystem store reads its own files.
    s3_cache_bytes: int = Field(default=2 * 1024**3, ge=0)
    # Where that cache is (default DATA_DIR/cache/objects): a local disk, one per node.
    s3_cache_dir: Path | None = None

    host: str = "127.0.0.1"
    # Ports are checked here: 70000 failed with an OverflowError only after
    # the archive was created and the admin password printed.
    dicom_port: int = Field(default=11112, ge=1, le=65535)
    http_port: int = Field(default=8042, ge=1, le=65535)
    # Seconds an HTTP client has to send a request's line and headers (from
    # connecting, or from its first byte on a kept-alive connection): a client
    # that sends nothing, or dribbles headers, would hold its descriptor for
    # good. Bodies have the stall limit below, never a total deadline.
    http_header_timeout: float = Field(default=30.0, gt=0)
    # Seconds a request body may send no byte at all (from its headers, or
    # its last byte) before the connection is closed (408 if nothing was
    # answered yet): a half-sent body held its descriptor and connection for
    # good. A slow link that keeps sending is never cut. STOW-RS uploads keep
    # dicom_timeout as their own limit (answered with their STOW report).
    http_body_stall_timeout: float = Field(default=60.0, gt=0)
    hl7_port: int = Field(default=2575, ge=1, le=65535)
    # Close an HL7 MLLP connection that sends nothing for this many seconds (0: never).
    hl7_idle_timeout: float = 300.0
    # Addresses or networks (comma-separated, e.g. "10.0.5.20, 10.0.6.0/24")
    # that may send HL7 (orders, patient updates and merges): MLLP carries no
    # credentials. Empty: any (with a warning when the listener is not local).
    hl7_allowed_hosts: str = ""
    # MSH-11 this archive applies (P production, T training, D debugging):
    # messages for another are refused (AR 202), so a test HIS cannot change
    # real patients. Empty MSH-11 counts as ours.
    hl7_processing_id: str = "P"
    # Seconds the HIS has to ACK an outbound message before it is sent again
    # (behind a slow link a HIS may take longer than a LAN one).
    hl7_ack_timeout: float = Field(default=30.0, gt=0)
    # HL7 (MLLP) connections served at once (a HIS uses a handful), and from
    # one address (0: half of hl7_max_connections). More are closed as soon as
    # accepted: idle connections by the thousand took the node down.
    hl7_max_connections: int = Field(default=32, ge=1)
    hl7_max_connections_per_host: int = Field(default=0, ge=0)
    # Seconds a client has to finish an HL7 message once its first byte came
    # (however slowly it trickles the rest); the connection is closed otherwise.
    hl7_frame_timeout: float = Field(default=60.0, gt=0)
    ae_title: str = "FILMLESS"

    # TLS (PS3.15 Annex B): this node's certificate and key, PEM (pacs certs issue).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # CA bundle that verifies peers we call and, with mutual TLS, our clients.
    tls_ca: Path | None = None
    # Mutual TLS: only clients with a certificate from tls_ca may connect (DICOM and HTTPS).
    tls_require_client_cert: bool = False
    # A second DICOM listener speaking TLS (2762 is IANA's dicom-tls); needs tls_cert.
    dicom_tls_port: int | None = Field(default=None, ge=1, le=65535)
    # Keep the plain DICOM port for legacy modalities; false leaves only the TLS one.
    dicom_plain: bool = True
    # Serve the HTTP API as HTTPS with the same certificate.
    http_tls: bool = False

    # Calling-AE allowlist: off for ease on a demo, on in production config.
    ae_allowlist: bool = False
    # With the allowlist: a calling AE must also come from its registered host
    # (an AE title alone is easily claimed by any machine on the network).
    ae_check_host: bool = False
    duplicate_policy: Literal["keep", "overwrite"] = "keep"
    # Storage SOP classes the C-STORE SCP accepts besides the standard and
    # retired ones it knows (dicom_scp.contexts): a vendor's private class,
    # such as the Siemens CSA Non-Image objects (spectroscopy, raw data) an
    # MR or CT sends as 1.3.12.2.1107.5.9.1, or a standard class newer than
    # this release. TOML list or comma-separated UIDs (PACS_EXTRA_STORAGE_CLASSES).
    # They are accepted in every syntax a standard class is, stored as
    # received, indexed, found by C-FIND/QIDO-RS and sent back by C-MOVE,
    # C-GET and routing. Unlisted classes are refused (presentation context
    # rejected: abstract syntax not supported), as DCMTK's storescp and
    # Orthanc (UnknownSopClassAccepted=false) do by default. STOW-RS stores
    # any SOP class whatever this list says, as dcm4chee-arc and Orthanc do:
    # DICOMweb has no per-class negotiation, and a user who may STOW may
    # store; this list only opens the DIMSE door for a modality (and for a
    # C-GET requester, whose storage context of the class it accepts).
    extra_storage_classes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_associations: int = Field(default=32, ge=1)
    # Connections one peer address may hold at once (0 = half of
    # max_associations): one host cannot take every slot.
    max_associations_per_host: int = Field(default=0, ge=0)
    # DICOM worker processes sharing the port (dicom_scp.workers): more than 1
    # spreads concurrent associations over the cores; max_associations is the
    # total, split between them. 0 = one per core.
    dicom_workers: int = Field(default=1, ge=0)
    # Association threads wait on their socket instead of polling every 1 ms
    # (dicom_scp.reactor); false restores pynetdicom's own loop.
    dicom_event_driven: bool = True
    max_pdu_size: int = 262_144
    dicom_timeout: float = 60.0
    # Seconds to open a TCP connection to a DICOM peer (C-MOVE destination,
    # routing, remote Q/R, storage commitment reports).
    dicom_connect_timeout: float = Field(default=15.0, gt=0)
    max_object_bytes: int = 4 * 1024**3
    # Refuse new objects (0xA700) before the disk is full rather than fail mid-write.
    min_free_bytes: int = 512 * 1024**2
    # Group commit: how long the committer waits to gather more index rows.
    commit_batch_max: int = 256
    offer_samples: bool = True
    # HTTP API access control. Only a local demo may turn it off, explicitly.
    auth_enabled: bool = True
    # GET /metrics (Prometheus): seconds the figures read from the index are
    # reused, so that several scrapers (or a storm of scrapes) read the index
    # once per period; 0: each scrape reads it.
    metrics_cache_seconds: float = Field(default=10.0, ge=0)
    # Scrapes of /metrics from this machine itself (loopback, no proxy
    # header) need no token: a Prometheus or Zabbix agent on the same host.
    metrics_local_unauthenticated: bool = False
    # This node's name in a cluster (claims of routing jobs); default host:data dir.
    node_id: str | None = None
    # Secret for consistent de-identification (default: a random one kept in the data dir).
    deidentify_salt: str | None = None
    route_max_attempts: int = 10
    # Seconds before a failed routing job is tried again, doubled per try
    # (up to 1024x), at most 10 minutes.
    route_retry_seconds: float = Field(default=1.0, gt=0)
    # Seconds a serving node keeps the routing rules it read: a rule added,
    # changed or removed by `pacs route` (or another node) applies to the
    # objects received this long after at the latest. 0 reads them per object.
    route_rules_refresh_seconds: float = Field(default=2.0, ge=0)
    route_concurrency: int = 4
    # Objects this archive fetched itself (its C-MOVE or C-GET of an old PACS:
    # pacs remote pull / get) take the routing rules too; off, a migration
    # does not send years of priors to the destinations of new examinations.
    route_retrieved: bool = False
    # Seconds a node's claim on the routing jobs it sends lasts without being
    # renewed (it is renewed while they are sent): how long the jobs of a node
    # that died wait before another node of the cluster takes them over.
    route_lease_seconds: float = Field(default=300.0, gt=0)
    # Finished routing jobs (done, cancelled) are deleted after this many days; 0 keeps them.
    route_keep_days: int = Field(default=30, ge=0)
    # Prefetch of prior studies (pacs.prefetch): when the HIS places a new
    # order, the patient's earlier studies are fetched from these old PACS
    # (AE titles of the registry, in the order asked) before the exam, so the
    # radiologist has them when reading. "TITLE" retrieves by C-MOVE (the old
    # PACS must know our AE title, as for `pacs remote pull`), "TITLE:get" by
    # C-GET. TOML list or comma-separated (PACS_PREFETCH_SOURCES="OLDPACS,
    # RIS2:get"). Empty: no prefetch.
    prefetch_sources: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # How far back a prior may be, in years before today (0: any date; then
    # studies without a Study Date are taken too).
    prefetch_years: int = Field(default=5, ge=0)
    # "all" the patient's studies, or only those with the ordered modality ("same").
    prefetch_modality: Literal["all", "same"] = "all"
    # The newest this many priors (of those matching) are made complete here per order.
    prefetch_max_studies: int = Field(default=10, ge=1)
    # Tries of a prefetch job (an old PACS down, a study it cannot send) before it is dead.
    prefetch_max_attempts: int = Field(default=10, ge=1)
    # Seconds before a job that did not finish is tried again, doubled per
    # try, at most an hour: an old PACS down is asked again after 1, 2, 4...
    # minutes, not in a loop.
    prefetch_retry_seconds: float = Field(default=60.0, gt=0)
    # Which of the patient's other identifiers the old PACS is searched by too,
    # by their HL7 identifier type (CX-5) or issuer (CX-4): a national ID
    # (NI, NN; CCCD, CMND) and the IDs the HIS merged away (MERGED) name this
    # person only; an insurance number (BHYT) is shared within a family and
    # often mistyped, and would fetch another person's studies. "*": all.
    prefetch_other_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["NI", "NN", "CCCD", "CMND", "MERGED"])
    # Seconds between two sweeps of due tombstones (objects compress replaced, deletions that died);
    # the same round checkpoints the SQLite index's -wal file once it has grown (pacs.index.db.checkpoint_wal).
    tombstone_sweep_interval: float = Field(default=300.0, gt=0)
    route: list[RouteEntry] = Field(default_factory=list)
    # The HIS MLLP endpoint ("host:port") for outbound HL7 (status, results).
    his_mllp: str | None = None
    # Tell the HIS of its orders' status changes (ORM^O01 IP/CM/SC); false
    # for a HIS that takes results (ORU) only and refuses them.
    his_order_status: bool = True
    # Modalities without MPPS (most ultrasound, older X-ray): a scheduled step
    # becomes IN PROGRESS when images linked to its order arrive, and
    # COMPLETED once its study received nothing for this many seconds (the
    # HIS told IP, then CM, as an MPPS would have; an MPPS naming the step
    # decides instead). 0: only MPPS moves worklist steps.
    worklist_images_stable_seconds: int = Field(default=600, ge=0)
    # A step still SCHEDULED this many days after its scheduled date is no
    # longer offered on the worklist (the order stays, for reports and the
    # HIS); 0: offered for ever.
    worklist_expire_days: int = Field(default=7, ge=0)
    # Seconds before a message the HIS refused or did not take is sent
    # again, doubled per try (up to 64x), at most his_retry_max_seconds.
    his_retry_seconds: float = Field(default=1.0, gt=0)
    his_retry_max_seconds: float = Field(default=60.0, gt=0)
    # MSH-3/4 (us) and MSH-5/6 (the HIS) of outbound messages: interface
    # engines route on them. Our application defaults to the AE title.
    hl7_application: str | None = None
    hl7_facility: str = ""
    his_application: str = "HIS"
    his_facility: str = ""

    @field_validator("index_url")
    @classmethod
    def _index_url(cls, value: str | None) -> str | None:
        # A typo in the scheme failed later as "ModuleNotFoundError: No module
        # named 'MySQLdb'" or "Can't load plugin", naming no setting.
        problem = index_url_problem(value) if value else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        from storage import url_problem

        problem = url_problem(value) if value else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("his_mllp")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        # Checked at start: a value without a port used to fail only once
        # the listeners were up, with an int() traceback.
        if not value:
            return None
        host, _, port = value.strip().rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"his_mllp must be host:port (e.g. 10.0.0.7:2575), not {value!r}")
        return value.strip()
    # Absolute URL clients reach the HTTP API at (behind a reverse proxy);
    # default: taken from each request.
    public_url: str | None = None
    # Patient share links (pacs share create, POST /api/studies/{uid}/shares):
    # the days a new link lasts unless its creator says, and the most it may.
    # At most ten years: a later expiry overflowed the date (a 500 on every new link).
    share_days: int = Field(default=30, ge=1, le=3650)
    share_days_max: int = Field(default=365, ge=1, le=3650)
    # A share link's page first asks the patient's birth year (when the
    # index has a birth date): a photo of the printed QR code, or a lost
    # receipt, is then not enough to see the images. Off: the link alone.
    share_birth_year: bool = True
    # Digital signature of signed reports' PDFs (PAdES, chữ ký số; see
    # pacs.report_signature): "off" (the report is signed in the index only,
    # as before), "radiologist" (the radiologist's certificate, imported with
    # `pacs user certificate import`, unlocked by their PIN at signing),
    # "organization" (the hospital's seal, chữ ký số tổ chức, alone) or
    # "both" (the radiologist's, then the seal's counter-signature).
    report_signature: Literal["off", "radiologist", "organization", "both"] = "off"
    # The hospital's seal: a PKCS#12 file, its password in PACS_REPORT_SEAL_PASSWORD.
    report_seal_pkcs12: Path | None = None
    report_seal_password: str | None = None
    # An RFC 3161 time-stamping authority: signatures become PAdES B-T (a
    # trusted time of signing). Empty: B-B, the signer's claimed time.
    report_tsa_url: str = ""
    # PEM files of the CAs a signature is trusted to (pacs report verify, the
    # viewer's badge): the national root CA, the hospital's. TOML list or comma-separated.
    report_trust_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # The signature's location (the hospital's name). Empty: the study's Institution Name.
    report_signature_location: str = ""
    # The report's letterhead (tiêu đề phiếu kết quả), printed at the top of
    # its first page: lines at the left (the health department, the hospital,
    # the department: "SỞ Y TẾ TỈNH NAM ĐỊNH", "BỆNH VIỆN ĐA KHOA TỈNH", "KHOA
    # CHẨN ĐOÁN HÌNH ẢNH") and at the right (the national motto), and a logo
    # (PNG or JPEG) before them. TOML lists, or lines separated by "|" in the
    # environment. Nothing set: the study's Institution Name alone, as before.
    report_header_left: Annotated[list[str], NoDecode] = Field(default_factory=list)
    report_header_right: Annotated[list[str], NoDecode] = Field(default_factory=list)
    report_logo: Path | None = None
    # Where reports are signed, before the date of the signature block
    # ("Nam Định, ngày 15 tháng 01 năm 2024"). Empty: the date alone.
    report_place: str = ""
    # The signing secret (pacs.signing_keys), kept out of the index and its
    # backups: the radiologists' keys are sealed under it and their PIN, so a
    # copy of the index alone does not open them to a PIN guessed offline.
    # signing_secret (PACS_SIGNING_SECRET, base64 or hex) wins; else the file
    # (default DATA_DIR/secrets/signing.key, 32 random bytes made at the first
    # certificate import). Every node that signs needs the same one.
    signing_secret: str | None = None
    signing_secret_file: Path | None = None
    # A radiologist's claim on a study ("đang đọc", pacs.reading_claims) ends
    # this long after the viewer last said the study is still open (it says
    # so every minute or more often); fractions of a minute are taken.
    reading_claim_minutes: float = Field(default=30.0, gt=0, le=24 * 60)
    # Web origins (comma-separated, e.g. "https://emr.bvdk.vn"; "*" for any)
    # whose pages may call the HTTP API from the browser: an EMR or a DICOMweb
    # viewer (OHIF) served from another host. Empty: same origin only.
    cors_origins: str = ""
    # Reverse proxies (comma-separated addresses, "*" for any) whose
    # X-Forwarded-For / X-Forwarded-Proto are believed: the client address in
    # the audit trail. Empty: none (a client cannot name another address).
    trusted_proxies: str = ""
    # The hospital's time zone (IANA name, e.g. "Asia/Ho_Chi_Minh"): DICOM
    # dates and times we write, HL7 timestamps, the time of day of an order
    # without one. Empty: the server's own zone (TZ), which in a container or
    # on a server set to UTC is 7 hours off for Vietnam: `pacs serve` warns.
    timezone: str = ""
    # Encoded rendered frames and thumbnails kept in memory (LRU).
    render_cache_bytes: int = 64 * 1024**2
    # Bytes of decoded pixels the conversions of this process may hold at
    # once (pacs.pixel_memory): a frame counts from its decode until it is
    # written out to the client (decoded WADO-RS frames, instances given in
    # another transfer syntax over WADO-RS, WADO-URI, C-MOVE, C-GET and
    # routing, rendered frames); more wait their turn, and a frame larger
    # than this is converted alone. The default keeps `pacs serve` under
    # 300 MB with eight clients converting 17 MB frames at once (issue 9,
    # scenario 8): of 300 MB, ~136 MB idle, ~115 MB converting one such
    # frame to JPEG 2000 (its decode, then the encoder's buffers beside the
    # decoded frame; codec work takes one such frame at a time) and 1-2 MB
    # per client in the HTTP layer leave ~30 MB for what is held besides
    # that frame's own 17 MB. 24 MB: one decoded 17 MB frame at a time, or
    # the one being converted and little else (48 CT slices of 512 KB).
    conversion_memory_bytes: int = Field(default=24 * 1024**2, ge=1024**2)
    # Seconds a conversion waits for room before it is refused (HTTP 503
    # with Retry-After; a failed C-STORE sub-operation; routing tries
    # again). A wait lasts about one frame's conversion per client ahead in
    # line (1-3 s for a 17 MB frame here): a minute is dozens of clients, or
    # frames held by clients that stopped reading.
    conversion_wait_seconds: float = Field(default=60.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    ae: list[KnownAeEntry] = Field(default_factory=list)

    @field_validator("share_days_max")
    @classmethod
    def _share_days_in_reach(cls, value: int, info: ValidationInfo) -> int:
        days = info.data.get("share_days")
        if isinstance(days, int) and days > value:
            raise ValueError(f"is below share_days ({days}): a new share link would last longer than allowed")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: Any) -> Any:
        # "verbose" failed only once DICOM and HL7 listened (uvicorn's KeyError).
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_addresses(cls, value: str) -> str:
        import ipaddress

        for entry in (e.strip() for e in value.split(",")):
            if not entry or entry == "*":
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {entry!r} is not an address or network "
                                 "(e.g. 10.0.5.20, 10.0.6.0/24, or * for any)") from None
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins_with_scheme(cls, value: str) -> str:
        from urllib.parse import urlsplit

        for entry in (e.strip().rstrip("/") for e in value.split(",")):
            if not entry or entry == "*":
                continue
            # A browser sends Origin as scheme://host[:port]: "emr.local" never matched any.
            parts = urlsplit(entry)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError(f"cors_origins: {entry!r} is not an origin (scheme://host[:port], "
                                 "e.g. https://emr.bvdk.vn)")
        return value

    @field_validator("extra_storage_classes", mode="before")
    @classmethod
    def _uid_list(cls, value: Any) -> Any:
        # The environment gives one string: UIDs separated by commas or spaces.
        if isinstance(value, str):
            return value.replace(",", " ").split()
        return value

    @field_validator("signing_secret")
    @classmethod
    def _signing_secret_decodes(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # an empty PACS_SIGNING_SECRET (a compose default): the file
        decode_signing_secret(value)
        return value.strip()

    @field_validator("report_trust_roots", mode="before")
    @classmethod
    def _path_list(cls, value: Any) -> Any:
        # The environment gives one string: files separated by commas.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("report_header_left", "report_header_right", mode="before")
    @classmethod
    def _header_lines(cls, value: Any) -> Any:
        # The environment gives one string: lines separated by "|" (an
        # address holds commas).
        if isinstance(value, str):
            return [part.strip() for part in value.split("|") if part.strip()]
        return value

    @field_validator("prefetch_sources", "prefetch_other_ids", mode="before")
    @classmethod
    def _source_list(cls, value: Any) -> Any:
        # The environment gives one string: sources separated by commas or spaces.
        if isinstance(value, str):
            return value.replace(",", " ").split()
        return value

    @field_validator("prefetch_sources")
    @classmethod
    def _prefetch_sources(cls, value: list[str]) -> list[str]:
        seen: dict[str, str] = {}
        for entry in value:
            title, _, method = entry.strip().partition(":")
            title = title.strip()
            if not 0 < len(title) <= 16 or "\\" in title:
                raise ValueError(f"prefetch_sources: {entry!r} is not an AE title (1-16 characters)")
            if method.strip().lower() not in ("", "move", "get"):
                raise ValueError(f"prefetch_sources: {entry!r}: the retrieve method is move or get "
                                 "(TITLE, TITLE:move or TITLE:get)")
            if title in seen:
                raise ValueError(f"prefetch_sources: {title} is listed twice")
            seen[title] = method.strip().lower() or "move"
        return [f"{title}:{method}" for title, method in seen.items()]

    @field_validator("extra_storage_classes")
    @classmethod
    def _storage_class_uids(cls, value: list[str]) -> list[str]:
        for uid in value:
            problem = storage_class_problem(uid)
            if problem:
                raise ValueError(f"extra_storage_classes: {uid!r} {problem}")
        return list(dict.fromkeys(value))

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        value = value.strip()
        if not 0 < len(value) <= 16 or "\\" in value:
            raise ValueError("AE title must be 1-16 characters without backslash")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        value = value.strip()
        if value:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r} (an IANA name such as Asia/Ho_Chi_Minh)") from None
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs = getattr(init_settings, "init_kwargs", {})
        return (init_settings, env_settings, _ConfigFileSource(settings_cls, init_kwargs))

    @property
    def node_name(self) -> str:
        """This node's name in a cluster: node_id, else host:data dir (stable
        across restarts; who claims routing jobs, the node label of /metrics)."""
        return self.node_id or f"{socket.gethostname()}:{os.path.abspath(self.data_dir)}"

    @property
    def resolved_index_url(self) -> str:
        """The SQLAlchemy URL of the index (SQLite in the data dir by default)."""
        if self.index_url:
            url = self.index_url
            # psycopg 3 is the driver we ship; plain postgresql:// would pick psycopg2.
            for prefix in ("postgresql://", "postgres://"):
                if url.startswith(prefix):
                    url = "postgresql+psycopg://" + url[len(prefix) :]
            return url
        return f"sqlite:///{(self.data_dir / 'index.sqlite').absolute()}"

    @property
    def resolved_s3_cache_dir(self) -> Path:
        """Where the S3 store's local cache of objects is."""
        return (self.s3_cache_dir or self.data_dir / "cache" / "objects").absolute()

    @property
    def resolved_storage_url(self) -> str:
        """The object store URL (a folder in the data dir by default)."""
        return self.storage_url or f"file://{(self.data_dir / 'objects').absolute()}"

    @property
    def prefetch_source_methods(self) -> list[tuple[str, str]]:
        """The prefetch sources as (AE title, "move" or "get"), in order."""
        return [(title, method) for title, _, method in (s.partition(":") for s in self.prefetch_sources)]


# The signing secret's least length: a shorter one is guessed with the PIN.
MIN_SIGNING_SECRET = 16


def decode_signing_secret(text: str) -> bytes:
    """The bytes of ``signing_secret`` (PACS_SIGNING_SECRET): hex, else base64
    (standard or URL-safe, padding optional) of at least 16 bytes; the same
    bytes as the secret file's (``base64 -w0 signing.key``). ValueError otherwise."""
    text = text.strip()
    try:
        if len(text) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in text):
            value = bytes.fromhex(text)
        else:
            padded = text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)
            value = base64.b64decode(padded, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("is neither hex nor base64 (make one with: openssl rand -hex 32)") from None
    if len(value) < MIN_SIGNING_SECRET:
        raise ValueError(f"is {len(value)} bytes: at least {MIN_SIGNING_SECRET} random bytes are needed "
                         "(make one with: openssl rand -hex 32)")
    return value


def index_url_problem(url: str) -> str | None:
    """Why *url* cannot be the index's URL (None: it can): the index is
    SQLite or PostgreSQL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix):]
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        return "not a database URL (sqlite:////var/lib/pacs/index.sqlite or postgresql://USER@HOST/DB)"
    if backend not in ("sqlite", "postgresql"):
        return f"{backend!r} is not an index database: use sqlite:///PATH or postgresql://USER@HOST/DB"
    return None


def storage_class_problem(uid: str) -> str | None:
    """Why *uid* cannot be accepted as a storage SOP class (None: it can):
    not a UID (PS3.5 9.1: digits and dots, no leading zero, at most 64
    characters), or a UID that names something else (a transfer syntax, a
    query or another service's SOP class, which a storage context would
    take over)."""
    # Imported here: only a configured list pays for pynetdicom's import.
    from pydicom.uid import RE_VALID_UID, UID
    from pynetdicom.service_class import ServiceClass, StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    if len(uid) > 64 or not RE_VALID_UID.match(uid):
        return "is not a UID (digits and dots, no leading zeros, at most 64 characters)"
    parsed = UID(uid)
    if parsed.is_transfer_syntax:
        return f"is a transfer syntax ({parsed.name}), not a SOP class"
    if not parsed.is_private and parsed.type and parsed.type != "SOP Class":
        return f"is {parsed.name} ({parsed.type}), not a SOP class"
    service = uid_to_service_class(uid)
    if service not in (ServiceClass, StorageServiceClass):
        return f"is {parsed.name}, a {service.__name__} SOP class, not a storage one"
    return None


@functools.cache
def _warn_unknown_environment() -> None:
    # Once per process: a command loads its settings more than once.
    for name in unknown_environment():
        print(f"warning: environment variable {name} is not a setting; ignored", file=sys.stderr)


# The service's settings (deploy/filmless-pacs.service's EnvironmentFile,
# written by scripts/install-service.sh).
DEFAULT_ENV_FILE = Path("/etc/filmless-pacs.env")


def _env_value(raw: str) -> str:
    # systemd's EnvironmentFile: one pair of surrounding quotes is removed;
    # a '#' inside a value is part of it (comments are whole lines only).
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
        if raw.strip()[0] == '"':
            value = value.replace('\\"', '"').replace("\\\\", "\\")
    return value


def parse_env_file(text: str) -> dict[str, str]:
    """The ``KEY=VALUE`` pairs of a systemd EnvironmentFile (``#``/``;``
    comment lines and blank lines skipped)."""
    pairs: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if key:
            pairs[key] = _env_value(value)
    return pairs


def load_env_file() -> Path | None:
    """Put the ``PACS_*`` variables of the service's settings file into this
    process's environment, so that a command run beside the service opens
    the service's archive (a `pacs import` that did not read it filled a
    second, SQLite index nobody served). The file is ``$PACS_ENV_FILE``
    (empty: none), else /etc/filmless-pacs.env when it exists. Variables
    already set win. Returns the file read, or None.

    Raises ValueError when the file named by PACS_ENV_FILE cannot be read.
    """
    named = os.environ.get("PACS_ENV_FILE")
    if named == "":
        return None
    path = Path(named) if named else DEFAULT_ENV_FILE
    if named is None and not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        if named is None:
            # Readable by root and the service user only: a command of
            # another user opens what its own settings say (the data dir's
            # record of the server's archive refuses a different one).
            print(f"warning: the service's settings {path} cannot be read ({exc.strerror}); run commands as the "
                  "service user (sudo -u pacs ...)", file=sys.stderr)
            return None
        raise ValueError(f"PACS_ENV_FILE={path}: cannot read it ({exc.strerror})") from None
    for key, value in parse_env_file(text).items():
        if key.startswith("PACS_") and key != "PACS_ENV_FILE":
            os.environ.setdefault(key, value)
    return path


# Values not repeated in an error line: they may hold a password or a key.
_SECRET_FIELDS = {"index_url", "storage_url", "s3_access_key", "s3_secret_key", "deidentify_salt",
                  "report_seal_password", "signing_secret"}


# Settings a `pacs` option sets too (pacs.cli).
_OPTIONS = {"data_dir", "index_url", "storage_url", "config_file", "log_level", "host", "dicom_port", "http_port",
            "hl7_port", "ae_title", "dicom_tls_port", "tls_cert", "tls_key", "tls_ca", "dicom_workers"}


def invalid_settings(exc: Any) -> list[str]:
    """One line per problem of a pydantic ValidationError of the settings:
    the setting, where it is set, what is wrong and the value given. The
    error's own text named the field only, and its value went missing
    from the console (rich took "[type=..., input_value=...]" for markup)."""
    lines = []
    for error in exc.errors():
        loc = list(error.get("loc", ())) or ["?"]
        name = str(loc[0])
        path = name + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])
        if len(loc) > 1:
            where = f"[[{name}]] in the config file"
        else:
            option = f"--{name.replace('_', '-')}, " if name in _OPTIONS else ""
            where = f"{option}PACS_{name.upper()} or {name} in the config file"
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        value = error.get("input")
        shown = name not in _SECRET_FIELDS and "input" in error and not isinstance(value, (dict, list)) \
            and str(value) not in message
        lines.append(f"setting {path} ({where}): {message}" + (f" (got {value!r})" if shown else ""))
    return lines


def load_settings(**overrides: Any) -> Settings:
    """Build settings, letting non-None keyword arguments (CLI flags) win.
    Unknown ``PACS_*`` variables are warned about on stderr (the logging of
    the command is not set up yet)."""
    _warn_unknown_environment()
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
