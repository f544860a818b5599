"""How a release run looks on a terminal (rich: a spinner per stage, a bar for long steps) and in CI logs
(one plain line per stage event, or per finished stage with --quiet)."""

from __future__ import annotations

import sys

import click

from .run import Observer
from .state import StageResult
from .spec import Stage


class ConsoleObserver(Observer):
    """How `workbench release` shows its stages on stderr: a line as each stage starts and ends, and its events on
    a rich spinner and bar on a terminal, else as plain lines; ``quiet``: only a line per finished stage;
    ``silent``: nothing."""
    def __init__(self, quiet: bool = False, silent: bool = False):
        self.quiet, self.silent = quiet, silent
        self.live = None
        if not quiet and not silent and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TimeElapsedColumn

            self.live = Progress(SpinnerColumn(), "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self.live.start()
        self.task = None
        self.label = ""

    def _line(self, text: str) -> None:
        if self.silent:
            return
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            click.echo(text, err=True)

    def stage_started(self, stage: Stage, number: int, total: int, reason: str) -> None:
        """Print "[n/total] id (kind): reason" (not with ``quiet``) and give the stage a fresh spinner on a terminal."""
        self.label = f"[{number}/{total}] {stage.id} ({stage.kind})"
        if not self.quiet:
            self._line(f"{self.label}: {reason}")
        if self.live is not None:
            if self.task is not None:
                self.live.remove_task(self.task)
            self.task = self.live.add_task(self.label, total=None)

    def event(self, message: str) -> None:
        """Show ``message`` beside the stage's spinner on a terminal, else as an indented line (not with ``quiet``)."""
        if self.live is not None and self.task is not None:
            self.live.update(self.task, description=f"{self.label}: {message}")
        elif not self.quiet:
            self._line(f"    {message}")

    def progress(self, done: int, total: int) -> None:
        """Move the stage's bar to ``done`` of ``total``; on a terminal only."""
        if self.live is not None and self.task is not None:
            self.live.update(self.task, completed=done, total=total)

    def stage_finished(self, result: StageResult) -> None:
        """One line, even with ``quiet``: the stage, its action, the seconds it ran, its error's first line."""
        took = f" in {result.seconds:.1f}s" if result.action in ("built", "failed", "incomplete") and result.seconds else ""
        error = f": {result.error.splitlines()[0]}" if result.error else ""
        self._line(f"{result.id}: {result.action}{took}{error}")

    def close(self) -> None:
        """Stop the rich display, if any, handing the terminal back; the command line calls it when the run ends."""
        if self.live is not None:
            self.live.stop()
            self.live = None
