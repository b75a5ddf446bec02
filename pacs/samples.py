"""Synthetic sample studies for a new installation: generate, then import."""

from __future__ import annotations

from pathlib import Path

from .app import Pacs
from .importer import ImportSummary, import_paths


def load_samples(pacs: Pacs, *, quick: bool = False, ct_slices: int | None = None) -> ImportSummary:
    """Generate the sample studies into ``DATA_DIR/samples`` and import them."""
    from sample_studies.generate import generate_all

    out = Path(pacs.settings.data_dir) / "samples"
    if not (out / "manifest.json").exists():
        generate_all(out, ct_slices=ct_slices, quick=quick)
    return import_paths(pacs, [out])
