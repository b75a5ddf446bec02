"""The SQL index: patients, studies, series, instances, and the AE registry.

Every query (C-FIND, QIDO-RS, worklist, stats) is answered from these tables;
no query opens a stored object. Values are kept as DICOM strings
(``YYYYMMDD`` dates sort and range-compare correctly as text) next to folded
search forms (see :mod:`pacs.names`). Study and series rows carry counters
so level queries never count instances.

Schema changes go through Alembic (``pacs/migrations``); a test checks the
migrations produce exactly this metadata.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from ..timezones import in_zone

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL wants BIGINT.
PK = BigInteger().with_variant(Integer(), "sqlite")
UID = String(64)
# The rows the patients' unique key covers (see Patient).
PATIENT_HAS_ID = "patient_id <> ''"

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """An instant, kept in UTC and always handed back aware (UTC).

    SQLite has no zone type: DateTime(timezone=True) writes the wall time of
    whatever datetime it is given, zone dropped, and reads it back naive --
    so a value written in another zone would be silently shifted, and every
    reader had to remember the values were UTC (the JSON API and the exports
    printed them without an offset; the viewer then read them as local time,
    7 hours off). PostgreSQL answers in the session's zone. Converting to UTC
    on the way in and marking UTC on the way out gives one behaviour on both.
    The DDL is DateTime(timezone=True)'s: no migration."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        """Aware values are converted to UTC; naive ones are taken as UTC
        (what the index always held)."""
        return in_zone(value, UTC) if isinstance(value, datetime) else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        """The stored instant, aware, in UTC."""
        return in_zone(value, UTC) if isinstance(value, datetime) else value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Patient(Base):
    """A patient as (Patient ID, Issuer of Patient ID). Patients without an
    ID are not one patient: the key covers those with an ID (migration 0013)."""

    __tablename__ = "patients"
    __table_args__ = (
        Index("uq_patients_patient_id_issuer", "patient_id", "issuer", unique=True,
              sqlite_where=text(PATIENT_HAS_ID), postgresql_where=text(PATIENT_HAS_ID)),
        # SQLite uses the partial one only where a query says PATIENT_HAS_ID itself (migration 0025).
        Index("ix_patients_patient_id", "patient_id", "issuer"),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(String, default="")
    issuer: Mapped[str] = mapped_column(String, default="")
    name: Mapped[str] = mapped_column(String, default="")
    name_folded: Mapped[str] = mapped_column(String, default="", index=True)
    # The folded name with "^" read as a space: what people type ("NGUYEN VAN AN").
    name_words: Mapped[str] = mapped_column(String, default="", index=True)
    # The name as read, family middle given ("TRINH VAN BINH" for
    # "Trịnh^Bình^Văn", pacs.names.name_reading). Added by migration 0021
    # with a server default and no Python one, as the study's two below: an
    # insert written for an earlier revision, which names them not, still works.
    name_reading: Mapped[str] = mapped_column(String, server_default="", index=True)
    birth_date: Mapped[str] = mapped_column(String, default="")
    sex: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # When what its FHIR Patient shows last changed (the shown columns, its
    # identifiers, its replaces links; without Patient ID, the study its id
    # names): meta.lastUpdated and _lastUpdated. Kept by triggers (migration
    # 0024); an insert sets it.
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    # Its demographics were set by the HIS or an administrator (migration
    # 0034): a new study received with others is corrected to them. A server
    # default only, as name_reading: an insert of an earlier revision works.
    registered: Mapped[bool] = mapped_column(Boolean, server_default=false())


class PatientNameWord(Base):
    """One word of a patient's name (pacs.index.name_words): the distinct
    words of name_words, one row each. A search for a word anywhere in the
    name ("AN" for "Nguyễn^Văn An": people are called by the given name, the
    last word) looks its start up here, a prefix range on the word index;
    on the name columns it was a LIKE '% AN%', which reads every patient.
    Added by migration 0025."""

    __tablename__ = "patient_name_words"
    __table_args__ = (
        # text_pattern_ops on PostgreSQL: a prefix LIKE uses the index under any collation.
        Index("ix_patient_name_words_word", "word", "patient_pk", postgresql_ops={"word": "text_pattern_ops"}),
    )

    # The key leads with the patient: its words are replaced and cascade-deleted by it.
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.pk", ondelete="CASCADE"), primary_key=True,
                                            autoincrement=False)
    word: Mapped[str] = mapped_column(String, primary_key=True)


class PatientIdentifier(Base):
    """Other identifiers of a patient: citizen ID (CCCD), insurance (BHYT)..."""

    __tablename__ = "patient_identifiers"
    __table_args__ = (UniqueConstraint("patient_pk", "value", "issuer"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.pk", ondelete="CASCADE"))
    value: Mapped[str] = mapped_column(String, index=True)
    issuer: Mapped[str] = mapped_column(String, default="")
    id_type: Mapped[str] = mapped_column(String, default="")


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (
        # A report state's studies, newest first (the unread worklist).
        Index("ix_studies_report_state", "report_state", "study_date", "study_time"),
        # The urgent studies not yet reported, listed first (the longest waiting first) and
        # counted (migrations 0032, 0033).
        Index("ix_studies_priority", "priority", "report_state", "created_at"),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.pk"), index=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_date: Mapped[str] = mapped_column(String, default="", index=True)
    study_time: Mapped[str] = mapped_column(String, default="")
    accession_number: Mapped[str] = mapped_column(String, default="", index=True)
    study_id: Mapped[str] = mapped_column(String, default="")
    referring_physician: Mapped[str] = mapped_column(String, default="")
    referring_physician_folded: Mapped[str] = mapped_column(String, default="", index=True)
    # Its word forms, searched as the patient's name is (name_words, name_reading).
    referring_physician_words: Mapped[str] = mapped_column(String, server_default="", index=True)
    referring_physician_reading: Mapped[str] = mapped_column(String, server_default="", index=True)
    description: Mapped[str] = mapped_column(String, default="")
    institution: Mapped[str] = mapped_column(String, default="")
    # Backslash-joined, the DICOM multi-value form of ModalitiesInStudy.
    modalities: Mapped[str] = mapped_column(String, default="")
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Time of the last instance received: drives "study stable" triggers.
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    # When what the study shows last changed (its row's shown columns, its
    # series, instances, patient's ID or name): FHIR meta.lastUpdated and
    # _lastUpdated. Kept by triggers (migration 0022); an insert sets it.
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    # unread, draft, signed, or amending (a draft over a signed version).
    # Kept by triggers on reports (migration 0026).
    report_state: Mapped[str] = mapped_column(String, server_default="unread")
    # The reading priority as a DICOM term (STAT, HIGH, ROUTINE, MEDIUM, LOW;
    # '' none, see pacs.priority): the linked order's, else image_priority.
    # Kept by triggers on study_orders and orders (migrations 0032, 0033: an
    # order withdrawn by the HIS makes it ROUTINE).
    priority: Mapped[str] = mapped_column(String, server_default="")
    # What the images said (Requested Procedure Priority), set at ingest of an
    # examination arriving, never of old data (pacs.ingest.Origin.examination).
    image_priority: Mapped[str] = mapped_column(String, server_default="")


class Series(Base):
    __tablename__ = "series"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.pk", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str] = mapped_column(String, default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    description: Mapped[str] = mapped_column(String, default="")
    body_part: Mapped[str] = mapped_column(String, default="")
    station_name: Mapped[str] = mapped_column(String, default="")
    series_date: Mapped[str] = mapped_column(String, default="")
    series_time: Mapped[str] = mapped_column(String, default="")
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Instance(Base):
    __tablename__ = "instances"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.pk", ondelete="CASCADE"), index=True)
    sop_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID, index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bits_allocated: Mapped[int | None] = mapped_column(Integer, nullable=True)
    photometric: Mapped[str] = mapped_column(String, default="")
    charset: Mapped[str] = mapped_column(String, default="")
    content_date: Mapped[str] = mapped_column(String, default="")
    content_time: Mapped[str] = mapped_column(String, default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String)
    # File offset of the Pixel Data element: frames can be read by range.
    pixel_offset: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    source: Mapped[str] = mapped_column(String, default="")
    calling_ae: Mapped[str] = mapped_column(String, default="")
    remote_host: Mapped[str] = mapped_column(String, default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class KnownAE(Base):
    """A DICOM peer we accept associations from and can send to (C-MOVE)."""

    __tablename__ = "known_aes"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(16), unique=True)
    host: Mapped[str] = mapped_column(String)
    port: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(String, default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # Associations we open to it (C-MOVE destination, routing, remote Q/R) use DICOM TLS.
    tls: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # What it may ask of us over DICOM: "*" or a comma list of pacs.aes.SERVICES.
    services: Mapped[str] = mapped_column(String, default="*", server_default="*")
    # SHA-256 of the only TLS client certificate it may call us with (hex), or None.
    cert_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # "ascii": its C-FIND and worklist answers carry text without diacritics
    # and no Specific Character Set (a modality that reads no UTF-8); "": UTF-8.
    charset: Mapped[str] = mapped_column(String, default="", server_default="")



class Order(Base):
    """A scheduled procedure step from the HIS: one worklist item.

    One row per scheduled procedure step. The steps of one requested
    procedure (IHE RAD-4: one accession, one Study Instance UID, several
    Scheduled Procedure Steps) are rows with the same accession, study UID
    and requested procedure values, each with its own step ID, modality,
    station, start and status; its first row (lowest pk) stands for the
    requested procedure where one row is needed (study links, the HIS
    messages' order key; see :mod:`pacs.orders`). The HIS is the source of
    truth for its patient and codes; modalities read it as the Modality
    Worklist and report progress with MPPS.
    """

    __tablename__ = "orders"
    # A step is named by its accession and Scheduled Procedure Step ID; a
    # requested procedure sends its study UID once per step (indexed, not unique).
    __table_args__ = (UniqueConstraint("accession_number", "step_id"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.pk"), index=True)
    placer_order_number: Mapped[str] = mapped_column(String, default="", index=True)
    filler_order_number: Mapped[str] = mapped_column(String, default="")
    accession_number: Mapped[str] = mapped_column(String)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    requested_procedure_id: Mapped[str] = mapped_column(String, default="")
    requested_procedure_description: Mapped[str] = mapped_column(String, default="")
    procedure_code: Mapped[str] = mapped_column(String, default="")
    procedure_code_scheme: Mapped[str] = mapped_column(String, default="")
    procedure_code_meaning: Mapped[str] = mapped_column(String, default="")
    # Never empty: the accession when the HIS sent no step ID (migration 0016).
    step_id: Mapped[str] = mapped_column(String, default="")
    step_description: Mapped[str] = mapped_column(String, default="")
    modality: Mapped[str] = mapped_column(String, default="", index=True)
    station_ae_title: Mapped[str] = mapped_column(String, default="", index=True)
    station_name: Mapped[str] = mapped_column(String, default="")
    location: Mapped[str] = mapped_column(String, default="")
    start_date: Mapped[str] = mapped_column(String, default="", index=True)
    start_time: Mapped[str] = mapped_column(String, default="")
    performing_physician: Mapped[str] = mapped_column(String, default="")
    referring_physician: Mapped[str] = mapped_column(String, default="")
    priority: Mapped[str] = mapped_column(String, default="")
    reason: Mapped[str] = mapped_column(String, default="")
    # The step's protocol (HL7 OMI IPC-6): the worklist's Scheduled Protocol
    # Code Sequence, which the modality selects its protocol by (migration 0023).
    protocol_code: Mapped[str] = mapped_column(String, server_default="")
    protocol_code_scheme: Mapped[str] = mapped_column(String, server_default="")
    protocol_code_meaning: Mapped[str] = mapped_column(String, server_default="")
    # SCHEDULED, IN PROGRESS, COMPLETED, DISCONTINUED, CANCELLED
    status: Mapped[str] = mapped_column(String, default="SCHEDULED", index=True)
    # What moved the step last: "" nothing, "images" the images linked to its
    # order (a modality without MPPS), "mpps" a performed procedure step,
    # which then decides alone (see pacs.orders.OrderService.progress_from_images).
    progress_source: Mapped[str] = mapped_column(String, server_default="")
    source: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class StudyOrderLink(Base):
    """A received study reconciled with an order (by accession or study UID)."""

    __tablename__ = "study_orders"

    study_pk: Mapped[int] = mapped_column(
        ForeignKey("studies.pk", ondelete="CASCADE"), primary_key=True
    )
    order_pk: Mapped[int] = mapped_column(ForeignKey("orders.pk", ondelete="CASCADE"), index=True)
    matched_by: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Correction(Base):
    """A value in the index that differs from the received object, and why.

    The stored bytes never change; retrieval applies these corrections.
    """

    __tablename__ = "corrections"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.pk", ondelete="CASCADE"), index=True)
    keyword: Mapped[str] = mapped_column(String)
    received: Mapped[str] = mapped_column(String, default="")
    corrected: Mapped[str] = mapped_column(String, default="")
    reason: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PerformedStep(Base):
    """A Modality Performed Procedure Step (MPPS) reported by a modality."""

    __tablename__ = "performed_steps"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    sop_uid: Mapped[str] = mapped_column(UID, unique=True)
    order_pk: Mapped[int | None] = mapped_column(ForeignKey("orders.pk"), nullable=True, index=True)
    # JSON list of the pks of every order the step performs: an N-CREATE may
    # list several scheduled steps (IHE group case); order_pk is the first.
    order_pks: Mapped[str] = mapped_column(String, default="[]", server_default="[]")
    # JSON list of the N-CREATE's Scheduled Step Attributes items, [accession,
    # study UID, SPS ID] each: a step that matched no order (done before the
    # HIS ordered it) is adopted by the order that names it later. Only a
    # server default: an insert that leaves it out stays valid on an index
    # of an older schema (the migration tests write one).
    scheduled: Mapped[str] = mapped_column(String, server_default="[]")
    status: Mapped[str] = mapped_column(String, default="IN PROGRESS")
    modality: Mapped[str] = mapped_column(String, default="")
    station_ae_title: Mapped[str] = mapped_column(String, default="")
    start: Mapped[str] = mapped_column(String, default="")
    end: Mapped[str] = mapped_column(String, default="")
    # JSON list of {"series_uid", "instances": [sop uids]} from PerformedSeriesSequence.
    performed_series: Mapped[str] = mapped_column(String, default="[]")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class OutboundMessage(Base):
    """Durable outbox for messages to other systems (HL7 to the HIS)."""

    __tablename__ = "outbound_messages"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    destination: Mapped[str] = mapped_column(String, default="his", index=True)
    kind: Mapped[str] = mapped_column(String, default="")
    payload: Mapped[str] = mapped_column(String)
    # pending, sent, dead
    state: Mapped[str] = mapped_column(String, default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    last_error: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ReceivedMessage(Base):
    """An inbound HL7 message that was applied, so that the same message sent
    again (the sender never got our ACK: the link dropped) is acknowledged
    again instead of being applied twice (HL7 v2.5 2.10.2). Recorded in the
    transaction that applied it; kept 30 days (:mod:`pacs.orders`)."""

    __tablename__ = "received_messages"
    __table_args__ = (UniqueConstraint("sender", "control_id"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    # MSH-3^MSH-4: control IDs are unique per sending application only.
    sender: Mapped[str] = mapped_column(String)
    control_id: Mapped[str] = mapped_column(String)
    kind: Mapped[str] = mapped_column(String, default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class User(Base):
    """A person or system that uses the HTTP API, with one role."""

    __tablename__ = "users"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String, default="")
    # modality, radiologist, referring, emr, his, admin
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String, default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ApiToken(Base):
    """A bearer token (stored as its sha256 only); sessions are tokens too."""

    __tablename__ = "api_tokens"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.pk", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class AuditEvent(Base):
    """Who did what to which patient's data: append-only (triggers refuse
    UPDATE and DELETE), exportable as RFC 3881 / IHE ATNA style records."""

    __tablename__ = "audit_events"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    user: Mapped[str] = mapped_column(String, default="", index=True)
    role: Mapped[str] = mapped_column(String, default="")
    client: Mapped[str] = mapped_column(String, default="")
    protocol: Mapped[str] = mapped_column(String, default="")
    # view, download, query, store, report-create, report-update, report-sign,
    # report-amend, export, delete, login, login-failed, login-lockout, denied,
    # user-add, user-disable, token-create, token-revoke, template-create,
    # template-update, template-archive, key-images-update, annotations-update
    action: Mapped[str] = mapped_column(String, index=True)
    outcome: Mapped[str] = mapped_column(String, default="success")
    study_uid: Mapped[str] = mapped_column(String, default="", index=True)
    patient_id: Mapped[str] = mapped_column(String, default="", index=True)
    detail: Mapped[str] = mapped_column(String, default="")


class Report(Base):
    """One version of a study's report. Signed versions never change; an
    amendment is a new version."""

    __tablename__ = "reports"
    __table_args__ = (UniqueConstraint("study_pk", "version"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.pk", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    # draft, signed
    status: Mapped[str] = mapped_column(String, default="draft")
    findings: Mapped[str] = mapped_column(String, default="")
    impression: Mapped[str] = mapped_column(String, default="")
    author: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    signed_by: Mapped[str] = mapped_column(String, default="")
    # Indexed: the reports signed in a period (pacs activity).
    signed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)
    # The Encapsulated PDF instance stored into the study when signed.
    pdf_sop_uid: Mapped[str] = mapped_column(String, default="")
    # Counts the saves of this version: a save or a signature names the
    # revision its author saw, and is refused (409) when another came between.
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


# The report templates of migration 0030: the rows a name is unique among.
TEMPLATE_ACTIVE = "archived_at IS NULL"


class ReportTemplate(Base):
    """A report template ("mẫu kết quả"): findings and impression text a
    radiologist starts a report from (pacs.report_templates). ``owner`` ''
    is the department's (shared), else the username of the radiologist whose
    own it is. Archived, never deleted: a report written from one stays
    explainable. Its name is unique per owner among the active ones."""

    __tablename__ = "report_templates"
    __table_args__ = (
        Index("uq_report_templates_owner_name_key", "owner", "name_key", unique=True,
              sqlite_where=text(TEMPLATE_ACTIVE), postgresql_where=text(TEMPLATE_ACTIVE)),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64), default="")
    name: Mapped[str] = mapped_column(String)
    # The name compared for uniqueness: case and spacing ignored, diacritics kept
    # ("Bụng" and "Bùng" are two words), pacs.report_templates.name_key.
    name_key: Mapped[str] = mapped_column(String)
    # Searched without diacritics (pacs.names.fold): "SIEU AM" finds "Siêu âm".
    name_folded: Mapped[str] = mapped_column(String, default="")
    # Upper case, free text (DICOM codes: US, ABDOMEN); '' matches any study. A
    # modality may name several ("CR/DX").
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(16), default="")
    findings: Mapped[str] = mapped_column(String, default="")
    impression: Mapped[str] = mapped_column(String, default="")
    created_by: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_by: Mapped[str] = mapped_column(String, default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Counts the changes: an update names the version its author read, 409 when another came between.
    version: Mapped[int] = mapped_column(Integer, default=1)
    archived_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    archived_by: Mapped[str] = mapped_column(String, default="")


class RoutingRule(Base):
    """Forward matching objects to a DICOM AE or a DICOMweb endpoint."""

    __tablename__ = "routing_rules"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # JSON list of {"attribute": keyword | "CallingAE", "op": "eq|wildcard|regex", "value": ...}
    conditions: Mapped[str] = mapped_column(String, default="[]")
    # "dicom" (destination = registered AE title) or "dicomweb" (destination = base URL)
    destination_kind: Mapped[str] = mapped_column(String(16), default="dicom")
    destination: Mapped[str] = mapped_column(String)
    # Authorization header value for a DICOMweb destination ("Bearer ...").
    destination_auth: Mapped[str] = mapped_column(String, default="")
    # "", "uncompressed", "j2k-lossless", "jpegls-lossless" or a transfer syntax UID
    transcode: Mapped[str] = mapped_column(String, default="")
    deidentify: Mapped[bool] = mapped_column(Boolean, default=False)
    # JSON object keyword -> value set on the copy (tag morphing)
    morph: Mapped[str] = mapped_column(String, default="{}")
    # Route each instance at once (0) or a study once no instance arrived for N seconds.
    stable_seconds: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RouteJob(Base):
    """One object to one rule's destination; survives restarts."""

    __tablename__ = "route_jobs"
    __table_args__ = (UniqueConstraint("rule_pk", "sop_uid"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    rule_pk: Mapped[int] = mapped_column(ForeignKey("routing_rules.pk", ondelete="CASCADE"), index=True)
    sop_uid: Mapped[str] = mapped_column(UID)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    destination_key: Mapped[str] = mapped_column(String, index=True)
    # pending, sending, done, dead, cancelled
    state: Mapped[str] = mapped_column(String, default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    claimed_by: Mapped[str] = mapped_column(String, default="")
    last_error: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PrefetchJob(Base):
    """Prior studies to fetch from the old PACS for a new order (pacs.prefetch).

    Queued in the transaction that places the order, with the patient's
    identifiers as the HIS gave them then (the old PACS may know the patient
    under another one: the citizen ID). A node runs it under a lease
    (``claimed_by`` its claim, ``lease_until`` renewed while it runs); a job
    that did not finish waits until ``next_attempt_at`` (backoff) and is dead
    after prefetch_max_attempts tries. ``progress`` (JSON) keeps what each
    source was asked and each prior's outcome, so a retry fetches only what
    is still missing."""

    __tablename__ = "prefetch_jobs"
    __table_args__ = (Index("ix_prefetch_jobs_state_next_attempt_at", "state", "next_attempt_at"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(String, index=True)
    issuer: Mapped[str] = mapped_column(String, default="")
    # JSON list of [value, issuer, type]: the patient's other identifiers.
    other_ids: Mapped[str] = mapped_column(String, default="[]")
    # The ordered modalities, backslash-separated ("" for a job run by hand: any).
    modality: Mapped[str] = mapped_column(String, default="")
    accession_number: Mapped[str] = mapped_column(String, default="", index=True)
    # pending, running, done, dead
    state: Mapped[str] = mapped_column(String, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The claim of the node running it: node name and a token of this claim.
    claimed_by: Mapped[str] = mapped_column(String, default="")
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_error: Mapped[str] = mapped_column(String, default="")
    progress: Mapped[str] = mapped_column(String, default="{}")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class JobLease(Base):
    """Which process of the cluster runs a shared background job (purge,
    compress, migrate, reindex, verify --repair) right now: see pacs.leases.
    A row whose ``expires_at`` has passed is free (its holder crashed)."""

    __tablename__ = "job_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The node id (PACS_NODE_ID, else host:data dir) of the holder.
    holder: Mapped[str] = mapped_column(String)
    # Unique per acquisition (host:pid:random): two runs on one node still exclude each other.
    token: Mapped[str] = mapped_column(String(128))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The holder's last sign of life (each one pushes expires_at forward).
    heartbeat: Mapped[datetime] = mapped_column(UTCDateTime())


class LoginThrottle(Base):
    """Failed logins per username (``u:NAME``) or client address (``a:ADDR``),
    kept in the index so that every node and a restart see them: after too
    many failures in a window the key is locked for a short, increasing time
    (see pacs.auth). Rows idle for a day are pruned."""

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    # Failures since window_start (reset when the window has passed or a lock is set).
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime())
    last_failure_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Locks in a row: each one doubles the next lock's length (capped).
    lockouts: Mapped[int] = mapped_column(Integer, default=0)


class DeletingObject(Base):
    """A storage key whose index row a deletion (``pacs delete``, ``pacs
    purge``, ``DELETE /api/studies/...``) removed, written in the same
    transaction: the key's object is being deleted (see pacs.index.tombstones).

    ``finished_at`` is set once the object is gone (``outcome`` "deleted")
    or a resend of the instance took the key back first ("kept"); finished
    rows are kept a while (tombstones.RETAIN) so that an ingest whose object
    was written before that deletion can tell, then pruned."""

    __tablename__ = "deleting_objects"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    storage_key: Mapped[str] = mapped_column(String, index=True)
    # Which deletion (its id, also in the log) recorded it.
    deletion: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="")


class CriticalResult(Base):
    """A critical finding (kết quả nguy kịch) the radiologist flagged when
    signing a version of a study's report, open until someone records who
    was told and how (pacs.critical_results)."""

    __tablename__ = "critical_results"
    __table_args__ = (UniqueConstraint("study_pk", "version"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.pk", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    # What must be acted on, in the radiologist's words.
    note: Mapped[str] = mapped_column(String, default="")
    flagged_by: Mapped[str] = mapped_column(String(64))
    flagged_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    acknowledged_by: Mapped[str] = mapped_column(String(64), default="")
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Who was told, how: "BS. Lan, khoa Cấp cứu, qua điện thoại".
    acknowledgement: Mapped[str] = mapped_column(String, default="")


class RejectedInstance(Base):
    """An instance a rejection note withdrew (IHE IOCM, see pacs.rejections),
    written in the transaction that deleted its row, or, for one listed and
    not stored, when the note was applied. The ingest refuses the same SOP
    Instance UID from then on (0xA771, as dcm4chee answers a "subsequent
    occurrence of a rejected object"): a modality resending the whole study,
    or a router forwarding it late, must not bring the rejected images back.
    ``pacs rejections lift`` sets ``lifted_at``: the instance may come
    again, and the same note sent again does not withdraw it (another note
    rejecting it does)."""

    __tablename__ = "rejected_instances"

    sop_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    # The note's title: 113001 Rejected for Quality Reasons... (key_objects.REJECTION_TITLES).
    code: Mapped[str] = mapped_column(String(16))
    note_uid: Mapped[str] = mapped_column(UID)
    rejected_by: Mapped[str] = mapped_column(String(64))
    rejected_at: Mapped[datetime] = mapped_column(UTCDateTime())
    lifted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    lifted_by: Mapped[str] = mapped_column(String(64), default="")


class RejectionListing(Base):
    """Each rejection note that listed a rejected instance (not only the
    first, kept in ``rejected_instances.note_uid``): a lift stands against
    every one of them sent again, a note not among them rejects anew."""

    __tablename__ = "rejection_listings"

    sop_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    note_uid: Mapped[str] = mapped_column(UID, primary_key=True)


class CommitmentConflict(Base):
    """An object refused 0111H (its SOP Instance UID is kept in another
    study or series): the sender's copy was not stored, so a storage
    commitment request of that AE must not be answered "committed" for the
    UID (the modality would delete the only copy; see pacs.commitment).
    Written by the ingest; removed when that AE sends the UID again into the
    kept study and series. A row whose study and series are where the index
    now keeps the instance is moot (the kept copy was deleted and the
    sender's was stored since)."""

    __tablename__ = "commitment_conflicts"
    __table_args__ = (Index("ix_commitment_conflicts_sop_uid_calling_ae", "sop_uid", "calling_ae"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    sop_uid: Mapped[str] = mapped_column(UID)
    calling_ae: Mapped[str] = mapped_column(String(16))
    # Where the refused object was to go.
    study_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ShareLink(Base):
    """A link that shows one study, or the studies of one order, to its
    patient without an account (the QR code printed instead of film; see
    pacs.shares). Only the SHA-256 of its token is kept: a copy of the
    database opens no link. Deleted with its study (or order row). Added by
    migration 0028."""

    __tablename__ = "share_links"
    # A link names a study or an order, never both nor neither.
    __table_args__ = (CheckConstraint("(study_pk IS NULL) <> (order_pk IS NULL)", name="ck_share_links_one_target"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int | None] = mapped_column(ForeignKey("studies.pk", ondelete="CASCADE"), nullable=True,
                                                 index=True)
    # An order link: the first step's row of the requested procedure (the
    # row that stands for it, see Order), bound before its study exists.
    order_pk: Mapped[int | None] = mapped_column(ForeignKey("orders.pk", ondelete="CASCADE"), nullable=True,
                                                 index=True)
    # Who made it: a user of the HTTP API (the HIS's account), or "cli:<os user>".
    created_by: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_by: Mapped[str] = mapped_column(String, default="")
    # Opened: when last, and how many times (its page's study read).
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    # Wrong birth years answered since the last right one or lock, and the
    # lock they set: in the index, so every node and process sees them.
    failed_answers: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Locks so far since the last right answer: each is twice the one before.
    lockouts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Signs the cookie that says this browser answered the birth year (random per link).
    cookie_key: Mapped[str] = mapped_column(String(64))


class SigningCertificate(Base):
    """A radiologist's certificate for the digital signature of reports
    (chữ ký số, pacs.signing_keys): the certificate and the CA certificates
    that came with it in the PKCS#12, and the private key sealed under the
    radiologist's PIN (scrypt, AES-256-GCM): never a usable key in clear.
    One per user (a new import replaces it). Wrong PINs are counted and lock
    signing as a share link's wrong birth years do. Added by migration 0031."""

    __tablename__ = "signing_certificates"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.pk", ondelete="CASCADE"), unique=True)
    # DER of the signer's certificate; PEM of the chain the PKCS#12 carried.
    certificate: Mapped[bytes] = mapped_column(LargeBinary)
    chain_pem: Mapped[str] = mapped_column(String, default="")
    # Shown without parsing the certificate again (pacs user certificate show).
    subject: Mapped[str] = mapped_column(String, default="")
    issuer: Mapped[str] = mapped_column(String, default="")
    serial: Mapped[str] = mapped_column(String(64), default="")
    sha256: Mapped[str] = mapped_column(String(64), default="")
    not_before: Mapped[datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[datetime] = mapped_column(UTCDateTime())
    # The PKCS#8 key encrypted under the PIN (pacs.signing_keys.seal_key).
    sealed_key: Mapped[bytes] = mapped_column(LargeBinary)
    imported_at: Mapped[datetime] = mapped_column(UTCDateTime())
    imported_by: Mapped[str] = mapped_column(String, default="")
    # Wrong PINs since the last right one or lock, the lock they set, and
    # the locks in a row (each twice as long): columns, so every node sees them.
    failed_pins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    lockouts: Mapped[int] = mapped_column(Integer, default=0)


class ReadingClaim(Base):
    """A radiologist reading a study ("đang đọc"), shown to colleagues, until
    *expires_at* (the database's clock; refreshed while the study stays open),
    a release, a colleague's take-over or the report's signature. One per
    study, deleted with it (see pacs.reading_claims). Added by migration 0032."""

    __tablename__ = "reading_claims"
    # A radiologist's own claims ("Mine" in the worklist).
    __table_args__ = (Index("ix_reading_claims_username", "username", "expires_at"),)

    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.pk", ondelete="CASCADE"), primary_key=True,
                                          autoincrement=False)
    username: Mapped[str] = mapped_column(String(64))
    # As the colleagues' worklists show it ("BS. Trần Văn An").
    display_name: Mapped[str] = mapped_column(String, default="")
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
