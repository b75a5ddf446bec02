"""The CLI's two consoles (results on stdout, errors and progress on stderr).

``soft_wrap``: rich otherwise breaks long lines at the terminal width (80
columns in a pipe), splitting the paths and UIDs an operator copies or greps.
"""

from __future__ import annotations

from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
