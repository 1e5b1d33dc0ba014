"""Progress on stderr: a Rich bar on a terminal, plain log lines otherwise, nothing with --quiet.

The engine reports through event callbacks; this module is the only one that draws.
"""

from __future__ import annotations

import sys
import time
from functools import cache


@cache
def stderr_console():
    """Rich's console on stderr, made on first use (importing Rich costs time `ddpm --help` does not need)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def say(message: str, quiet: bool = False) -> None:
    """One informational line on stderr."""
    if not quiet:
        stderr_console().print(message, markup=False, soft_wrap=True)


class StepProgress:
    """A bar over a known number of steps, with a free-text status field."""

    def __init__(self, description: str, total: int, quiet: bool = False, log_every_s: float = 10.0):
        self.description, self.total, self.quiet = description, total, quiet
        self.interactive = sys.stderr.isatty() and not quiet
        self.log_every_s, self.last_log = log_every_s, 0.0
        self.completed, self.status = 0, ""
        self.progress = None

    def __enter__(self) -> StepProgress:
        if self.interactive:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                                     TimeRemainingColumn(), console=stderr_console(), transient=False,
                                     redirect_stdout=False, redirect_stderr=False)  # stdout carries results only
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=self.total, status="")
        return self

    def update(self, completed: int, status: str = "") -> None:
        self.completed, self.status = completed, status
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, status=status)
        elif not self.quiet:
            now = time.monotonic()
            if now - self.last_log >= self.log_every_s or completed == self.total:
                self.last_log = now
                print(f"{self.description}: {completed}/{self.total} {status}".rstrip(), file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
