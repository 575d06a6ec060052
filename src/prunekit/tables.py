"""Reports that show themselves as one rich table."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table


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
