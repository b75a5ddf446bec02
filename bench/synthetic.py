"""Bulk-load a synthetic archive straight into the index (no objects, no DICOM).

For query benchmarks and tests that need many rows: Vietnamese names with
realistic family-name frequencies, 12-digit citizen IDs, five years of study
dates, accession numbers, several modalities. Rows go in with executemany in
large transactions; the counter triggers keep series/study counts right.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, select

from pacs.index.models import Instance, Patient, PatientIdentifier, PatientNameWord, Series, Study
from pacs.index.name_words import words_of
from pacs.names import fold_name, name_reading, name_words

FAMILY = [("Nguyễn", 38), ("Trần", 11), ("Lê", 9), ("Phạm", 7), ("Hoàng", 5), ("Huỳnh", 4), ("Phan", 4),
          ("Vũ", 4), ("Võ", 3), ("Đặng", 2), ("Bùi", 2), ("Đỗ", 2), ("Hồ", 2), ("Ngô", 2), ("Dương", 1),
          ("Lý", 1)]
MIDDLE = ["Văn", "Thị", "Hữu", "Đức", "Minh", "Thanh", "Ngọc", "Quốc", "Thu", "Xuân", "Công", "Bảo"]
GIVEN = ["An", "Bình", "Cường", "Dũng", "Giang", "Hà", "Hải", "Hòa", "Hùng", "Hương", "Khánh", "Lan", "Linh",
         "Long", "Mai", "Nam", "Nga", "Phong", "Phúc", "Quang", "Sơn", "Tâm", "Thảo", "Trang", "Tuấn", "Vy", "Yến"]
MODALITIES = [("CT", 30), ("DX", 30), ("US", 20), ("MR", 10), ("CR", 10)]
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
             "DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1",
             "US": "1.2.840.10008.5.1.4.1.1.6.1"}
ROOT = "1.2.826.0.1.3680043.9.7135."


@dataclass(frozen=True)
class LoadSpec:
    studies: int = 100_000
    patients: int | None = None  # default: studies // 3
    instances_per_study: int = 10
    seed: int = 7
    start: date = date(2021, 1, 1)
    days: int = 5 * 365


def _weighted(rng: random.Random, table: list[tuple[str, int]]) -> str:
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


def patient_name(rng: random.Random) -> str:
    return f"{_weighted(rng, FAMILY)}^{rng.choice(MIDDLE)} {rng.choice(GIVEN)}"


def load(engine: Engine, spec: LoadSpec, *, batch: int = 20_000, progress: Any = None) -> dict[str, int]:
    """Insert the synthetic archive; returns counts."""
    rng = random.Random(spec.seed)
    now = datetime.now(UTC)
    n_patients = spec.patients or max(1, spec.studies // 3)
    with engine.connect() as conn:
        base_patient = conn.execute(select(Patient.pk).order_by(Patient.pk.desc()).limit(1)).scalar() or 0
        base_study = conn.execute(select(Study.pk).order_by(Study.pk.desc()).limit(1)).scalar() or 0
        base_series = conn.execute(select(Series.pk).order_by(Series.pk.desc()).limit(1)).scalar() or 0
    run = f"{spec.seed}.{base_study}."

    names: list[str] = []

    def patients() -> Iterator[dict[str, Any]]:
        for i in range(n_patients):
            name = patient_name(rng)
            names.append(name_words(name))
            yield {
                "pk": base_patient + i + 1,
                "patient_id": f"{rng.randint(1, 96):03d}{rng.randint(0, 1)}{rng.randint(40, 99):02d}{i % 1_000_000:06d}",
                "issuer": "CCCD", "name": name, "name_folded": fold_name(name), "name_words": name_words(name),
                "name_reading": name_reading(name),
                "birth_date": f"19{rng.randint(40, 99)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                "sex": rng.choice("MF"), "created_at": now, "updated_at": now, "changed_at": now,
            }

    def name_word_rows() -> Iterator[dict[str, Any]]:
        # As pacs.index.name_words.set_name_words keeps them (the patients are loaded first).
        for i, words in enumerate(names):
            for word in words_of(words):
                yield {"patient_pk": base_patient + i + 1, "word": word}

    def identifiers() -> Iterator[dict[str, Any]]:
        for i in range(n_patients):
            yield {"patient_pk": base_patient + i + 1, "value": f"DN{4000000000000 + base_patient + i}",
                   "issuer": "BHYT", "id_type": "TEXT"}

    series_plan: list[tuple[int, str]] = []

    def studies() -> Iterator[dict[str, Any]]:
        for i in range(spec.studies):
            day = spec.start + timedelta(days=rng.randrange(spec.days))
            modality = _weighted(rng, MODALITIES)
            n_series = 1 if modality in ("DX", "CR") else rng.randint(1, 3)
            for _ in range(n_series):
                series_plan.append((base_study + i + 1, modality))
            yield {
                "pk": base_study + i + 1, "patient_pk": base_patient + rng.randrange(n_patients) + 1,
                "study_uid": f"{ROOT}1.{run}{i}", "study_date": day.strftime("%Y%m%d"),
                "study_time": f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
                "accession_number": f"A{base_study + i:09d}", "study_id": str(i),
                "referring_physician": "Đỗ^Thanh Tùng", "referring_physician_folded": "DO^THANH TUNG",
                "referring_physician_words": "DO THANH TUNG", "referring_physician_reading": "DO THANH TUNG",
                "description": f"{modality} study", "institution": "BV Synthetic", "modalities": modality,
                "num_series": n_series, "num_instances": 0, "size_bytes": 0,
                "created_at": now, "updated_at": now, "changed_at": now,
            }

    def series() -> Iterator[dict[str, Any]]:
        for j, (study_pk, modality) in enumerate(series_plan):
            yield {
                "pk": base_series + j + 1, "study_pk": study_pk, "series_uid": f"{ROOT}2.{run}{j}",
                "modality": modality, "series_number": j % 10 + 1, "description": "", "body_part": "CHEST",
                "station_name": "", "series_date": "", "series_time": "", "num_instances": 0,
                "size_bytes": 0, "created_at": now, "updated_at": now,
            }

    def instances() -> Iterator[dict[str, Any]]:
        per_series = max(1, round(spec.instances_per_study * spec.studies / max(1, len(series_plan))))
        k = 0
        for j, (_study_pk, modality) in enumerate(series_plan):
            for n in range(per_series):
                k += 1
                yield {
                    "series_pk": base_series + j + 1, "sop_uid": f"{ROOT}3.{run}{k}",
                    "sop_class_uid": SOP_CLASS[modality], "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                    "instance_number": n + 1, "rows": 512, "columns": 512, "frames": None,
                    "bits_allocated": 16, "photometric": "MONOCHROME2", "charset": "ISO_IR 192",
                    "content_date": "", "content_time": "", "size_bytes": 526_000, "sha256": "0" * 64,
                    "storage_key": f"synthetic/{k}.dcm", "pixel_offset": None, "source": "synthetic",
                    "calling_ae": "", "remote_host": "", "received_at": now,
                }

    counts = {}
    for name, table, rows in (
        ("patients", Patient.__table__, patients()),
        ("name words", PatientNameWord.__table__, name_word_rows()),
        ("identifiers", PatientIdentifier.__table__, identifiers()),
        ("studies", Study.__table__, studies()),
        ("series", Series.__table__, series()),
        ("instances", Instance.__table__, instances()),
    ):
        counts[name] = _insert_all(engine, table, rows, batch, progress, name)
    _fix_sequences(engine)
    return counts


def _insert_all(engine: Engine, table: Any, rows: Iterator[dict[str, Any]], batch: int, progress: Any, name: str) -> int:
    total = 0
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= batch:
            total += _flush(engine, table, chunk)
            if progress:
                progress(name, total)
    total += _flush(engine, table, chunk)
    return total


def _flush(engine: Engine, table: Any, chunk: list[dict[str, Any]]) -> int:
    if not chunk:
        return 0
    with engine.begin() as conn:
        conn.execute(insert(table), chunk)
    n = len(chunk)
    chunk.clear()
    return n


def _fix_sequences(engine: Engine) -> None:
    # Explicit primary keys leave PostgreSQL's sequences behind.
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:
        for table in ("patients", "patient_identifiers", "studies", "series", "instances"):
            conn.exec_driver_sql(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'pk'), COALESCE((SELECT MAX(pk) FROM {table}), 1))"
            )
