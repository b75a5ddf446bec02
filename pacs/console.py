"""The CLI's two consoles (results on stdout, errors and progress on stderr).

``soft_wrap``: rich otherwise breaks long lines at the terminal width (80
columns in a pipe), splitting the paths and UIDs an operator copies or greps.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def fail(message: object) -> None:
    """An error on stderr, in red, printed as text: a message quoting a path,
    a patient name or a peer's answer may hold ``[...]``, which rich would
    take as markup (dropping it, or failing on a closing tag)."""
    err.print(Text(str(message), style="red"))


class TextTable(Table):
    """A rich table whose string cells are text, never markup (cells hold
    patient names, accession numbers, paths and error texts)."""

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in renderables), **kwargs)
