"""Rich output: reports that show themselves as one rich table, and the progress of long
work, shown as a transient rich bar on a terminal and reported through :mod:`logging`.

Every progress (:func:`progress_bar`) logs plain lines to the ``"prunekit"`` logger (at
INFO; at DEBUG while a bar shows the same, or when the caller turned progress off), at
most one every :data:`LOG_INTERVAL` seconds and one when it ends::

    training: epoch 2/5 loss 0.412 - 120/300 (40%), elapsed 0:00:12, ETA 0:00:18

with ``ETA = elapsed * (total - done) / done``. When stdout is not a terminal (a log
file, a pipe, CI) no bar is drawn; if nothing handles the ``"prunekit"`` logger (no
``logging`` configuration), the same lines are printed instead, so a long run in a log
file still says where it is. ``prunekit -v`` / ``-q`` set the logger's level.
"""

from __future__ import annotations

import datetime
import io
import logging
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

logger = logging.getLogger("prunekit")

LOG_INTERVAL = 10.0
"""Seconds between two plain progress lines of one task."""


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class LoggedProgress(Progress):
    """A rich :class:`~rich.progress.Progress` whose every update may also log a plain line
    (see the module docstring); ``echo`` prints the lines when no logging handler would
    show them."""

    def __init__(self, *columns: Any, echo: bool, level: int, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.echo, self.level = echo, level
        self._last: dict[TaskID, tuple[float, float]] = {}  # task: (time, done) last logged

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def stop(self) -> None:
        for task in self.tasks:  # the last line of each task, unless already logged
            if task.completed and self._last.get(task.id, (0, None))[1] != task.completed:
                self._report(task.id, force=True)
        super().stop()

    def _report(self, task_id: TaskID, force: bool = False) -> None:
        now = time.monotonic()
        task = self._tasks[task_id]
        last = self._last.setdefault(task_id, (now, 0))[0]
        if not force and now - last < LOG_INTERVAL:
            return
        self._last[task_id] = (now, task.completed)
        line = f"{task.description} - {task.completed:g}"
        elapsed = task.elapsed or 0.0
        if task.total:
            line += f"/{task.total:g} ({task.completed / task.total:.0%})"
        line += f", elapsed {_clock(elapsed)}"
        if task.total and task.completed:
            line += f", ETA {_clock(elapsed * (task.total - task.completed) / task.completed)}"
        logger.log(self.level, line)
        if self.echo and not logger.hasHandlers() and logger.level <= logging.INFO:
            print(line, flush=True)


def progress_bar(*, disable: bool = False, console: Console | None = None) -> LoggedProgress:
    """The project's progress: a transient rich bar (description, bar, ``done/total``,
    elapsed) on a terminal, plain lines through :mod:`logging` always (module docstring)."""
    shown = console or Console()
    interactive = shown.is_terminal or shown.is_jupyter
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    drawn = interactive and not disable
    return LoggedProgress(*columns, TimeElapsedColumn(), console=console, transient=True,
                          disable=not drawn, echo=not disable and not interactive,
                          level=logging.DEBUG if drawn or disable else logging.INFO)  # fmt: skip


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at each record (not the stream of
    the moment it was made, which a test's capture may have closed since)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def log_to_stderr(level: int) -> None:
    """Show the ``"prunekit"`` logger's records of ``level`` and above on stderr, one
    timestamped line each (what ``prunekit -v`` / ``-q`` set: DEBUG / WARNING, else INFO).
    One handler: a second call replaces the first one's."""
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.set_name("prunekit-cli")
    for old in [h for h in logger.handlers if h.get_name() == "prunekit-cli"]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)


class TableReport:
    """Mixin for a report with ``table()``: rich prints the table, ``str()`` renders it as
    plain text ``text_width`` columns wide (no colour codes)."""

    text_width = 140

    def table(self) -> Table:
        raise NotImplementedError

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=self.text_width, color_system=None)
        console.print(self.table())
        return console.file.getvalue()
