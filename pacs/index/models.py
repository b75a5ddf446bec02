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

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL wants BIGINT.
PK = BigInteger().with_variant(Integer(), "sqlite")
UID = String(64)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Patient(Base):
    """A patient as (Patient ID, Issuer of Patient ID)."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(String, default="")
    issuer: Mapped[str] = mapped_column(String, default="")
    name: Mapped[str] = mapped_column(String, default="")
    name_folded: Mapped[str] = mapped_column(String, default="", index=True)
    # The folded name with "^" read as a space: what people type ("NGUYEN VAN AN").
    name_words: Mapped[str] = mapped_column(String, default="", index=True)
    birth_date: Mapped[str] = mapped_column(String, default="")
    sex: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


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

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.pk"), index=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_date: Mapped[str] = mapped_column(String, default="", index=True)
    study_time: Mapped[str] = mapped_column(String, default="")
    accession_number: Mapped[str] = mapped_column(String, default="", index=True)
    study_id: Mapped[str] = mapped_column(String, default="")
    referring_physician: Mapped[str] = mapped_column(String, default="")
    referring_physician_folded: Mapped[str] = mapped_column(String, default="", index=True)
    description: Mapped[str] = mapped_column(String, default="")
    institution: Mapped[str] = mapped_column(String, default="")
    # Backslash-joined, the DICOM multi-value form of ModalitiesInStudy.
    modalities: Mapped[str] = mapped_column(String, default="")
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Time of the last instance received: drives "study stable" triggers.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


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
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class KnownAE(Base):
    """A DICOM peer we accept associations from and can send to (C-MOVE)."""

    __tablename__ = "known_aes"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(16), unique=True)
    host: Mapped[str] = mapped_column(String)
    port: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(String, default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

