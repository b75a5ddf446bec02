"""Synthetic DICOM sample studies (no real patient data) for demos, tests and benchmarks.

See :mod:`sample_studies.generate` and ``sample_studies/README.md``.  Files are
generated on demand; none are kept in the repository.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sample_studies.generate import (
        DEFAULT_SEED,
        MANIFEST_NAME,
        Patient,
        generate_all,
        get_patients,
        make_ct_series,
    )

__all__ = ["DEFAULT_SEED", "MANIFEST_NAME", "Patient", "generate_all", "get_patients", "make_ct_series"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that ``python -m sample_studies.generate`` does not find
    # the module already loaded by the package (runpy warns about that) and so
    # importing the package stays cheap.
    if name in __all__:
        from sample_studies import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
