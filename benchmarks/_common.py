"""What every benchmark script shares: timing, result rows, the rich table, BENCHMARKS.md.

Each script owns one section of BENCHMARKS.md between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` and rewrites only that section.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

MD_FILE = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
VERDICT = {True: "PASS", False: "MISS"}


class Rows:
    """Result rows ``(figure, value, target, verdict)``, printed as a table or written out."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.load_start = os.getloadavg()[0]

    def add(self, figure: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append((figure, value, target, "" if ok is None else VERDICT[ok]))

    def load(self) -> str:
        return f"{self.load_start:.1f} -> {os.getloadavg()[0]:.1f}"

    def show(self, title: str, console: Console | None = None) -> None:
        table = Table("Figure", "Value", "Target", "Verdict", title=f"{title}, load {self.load()}")
        for row in self.rows:  # cells are text: "[min, max]" is not rich markup
            table.add_row(*(escape(cell) for cell in row))
        (console or Console()).print(table)

    def markdown(self) -> list[str]:
        return [
            "| Figure | Value | Target | Verdict |",
            "|---|---:|---:|:---:|",
            *(f"| {' | '.join(row)} |" for row in self.rows),
        ]

    def protocol(self, script: str, extra: str = "") -> str:
        """One line: date, the exact command, torch version, threads, load (and ``extra``)."""
        cmd = f"PYTHONPATH=src .venv/bin/python benchmarks/{script} " + " ".join(sys.argv[1:])
        more = f", {extra}" if extra else ""
        return (
            f"Measured {datetime.date.today().isoformat()} with `{cmd.strip()}` "
            f"(torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {self.load()}{more})."
        )


def timed(fn: Callable[[], object], times: int) -> list[float]:
    """Wall-clock seconds of ``times`` calls of ``fn``."""
    out = []
    for _ in range(times):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def write_section(name: str, lines: list[str], path: Path = MD_FILE) -> None:
    """Replace the ``name`` section of ``path`` (default BENCHMARKS.md) by ``lines``
    (appended if it is missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text()
    if start not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    path.write_text(head + "\n".join([start, *lines, end]) + rest.split(end, 1)[1])
