"""Rich progress bars for long operations, shared by every subcommand; silent when quiet."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

stderr = Console(stderr=True)


@contextmanager
def byte_progress(description: str, total: int, *, quiet: bool = False
                  ) -> Iterator[Callable[[int, int], None]]:
    """A ``(done, total)`` callback that drives a bytes/GB-per-second/ETA bar on stderr."""
    if quiet:
        yield lambda done, total: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda done, _total: progress.update(task, completed=done)
