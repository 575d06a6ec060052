"""Rich output: reports that show themselves as one rich table, and the progress bar of
long work."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def progress_bar(*, disable: bool = False, console: Console | None = None) -> Progress:
    """The project's transient progress bar: description, bar, ``done/total``, elapsed."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return Progress(*columns, TimeElapsedColumn(), console=console, transient=True, disable=disable)


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
