"""Where the CLI prints its tables, so that every number in them can be read, and copied.

On a terminal rich fits a table to the window. Piped to a file or ``tee`` (benchmark logs, CI)
rich would fit it to ``$COLUMNS`` or 80 characters and cut numbers to ``0.…``; there the console
is as wide as what it prints, so each row is one line a reader or a script can take apart. On a
narrow terminal, columns wrap and fold their text (``number``, ``label``) instead of cutting it.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

#: The console's width where stdout is not a terminal: wider than any line the CLI prints, so
#: nothing is squeezed, wrapped or cut (rich pads no line to it).
UNBOUNDED = 10_000


def console() -> Console:
    """A console on stdout: the terminal's width there, else ``UNBOUNDED``."""
    out = Console()
    return out if out.is_terminal else Console(width=UNBOUNDED)


def number(table: Table, header: str, **options: Any) -> None:
    """A right-aligned column of numbers: wrapped at spaces (``12.3`` / ``MiB``) and folded when
    a window is too narrow, never cut short with ``…``."""
    table.add_column(header, justify="right", overflow="fold", **options)


def label(table: Table, header: str, **options: Any) -> None:
    """A column of names or notes, wrapped and folded to make room for the numbers."""
    table.add_column(header, overflow="fold", **options)
