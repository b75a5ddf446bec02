"""Storage maintenance: verify, reindex, migrate, purge, compress, export,
and the storage report for ``pacs stats``.

Every job is a core function on an open :class:`pacs.app.Pacs` that returns
a report object (``as_dict()`` for ``--json``); the CLI in
:mod:`pacs.cli_maintenance` only parses arguments and prints. Jobs stream
(index rows in pages, store listings in batches, objects in chunks) and can
be rerun after an interruption (see each module for how).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select

from ..app import Pacs
from .common import NullProgress, Progress, index_stored_object, series_t, studies_t
from .compress import CODECS, CompressReport, compress
from .export import ExportReport, deidentify_salt, export_studies
from .migrate import MigrateReport, config_path, migrate, set_config_value
from .purge import STATUSES, PurgeJournal, PurgeReport, PurgeRules, purge
from .reindex import ReindexReport, reindex
from .verify import VerifyReport, verify

log = logging.getLogger(__name__)


def storage_report(pacs: Pacs) -> dict[str, Any]:
    """Where the bytes are and what is waiting: bytes per modality (from the
    series counters), bytes per month of study date (``YYYY-MM``, "unknown"
    without a usable date), free space of the store (None when the backend
    cannot tell, e.g. S3), and queue depths (HL7 outbox, routing jobs)."""
    from .. import outbox, routing

    with pacs.engine.connect() as conn:
        by_modality = {
            (modality or "unknown"): {"series": int(n), "bytes": int(size or 0)}
            for modality, n, size in conn.execute(
                select(series_t.c.modality, func.count(), func.sum(series_t.c.size_bytes))
                .group_by(series_t.c.modality)
                .order_by(series_t.c.modality)
            )
        }
        month = func.substr(studies_t.c.study_date, 1, 6)
        by_month: dict[str, dict[str, int]] = {}
        for yyyymm, n, size in conn.execute(
            select(month, func.count(), func.sum(studies_t.c.size_bytes)).group_by(month).order_by(month)
        ):
            key = f"{yyyymm[:4]}-{yyyymm[4:6]}" if yyyymm and len(yyyymm) == 6 and yyyymm.isdigit() else "unknown"
            entry = by_month.setdefault(key, {"studies": 0, "bytes": 0})
            entry["studies"] += int(n)
            entry["bytes"] += int(size or 0)
    try:
        free = pacs.store.free_bytes()
    except Exception:  # a report must not fail on an unreachable store
        free = None
    queues: dict[str, Any] = {"outbox": outbox.depth(pacs.engine), "routing": routing.counts(pacs.engine)}
    return {
        "bytes_per_modality": by_modality,
        "bytes_per_month": dict(sorted(by_month.items())),
        "free_bytes": free,
        "min_free_bytes": pacs.settings.min_free_bytes,
        "queues": queues,
    }


__all__ = [
    "CODECS",
    "STATUSES",
    "CompressReport",
    "ExportReport",
    "MigrateReport",
    "NullProgress",
    "Progress",
    "PurgeJournal",
    "PurgeReport",
    "PurgeRules",
    "ReindexReport",
    "VerifyReport",
    "compress",
    "config_path",
    "deidentify_salt",
    "export_studies",
    "index_stored_object",
    "migrate",
    "purge",
    "reindex",
    "set_config_value",
    "storage_report",
    "verify",
]
