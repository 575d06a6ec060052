"""What every training-time reproduction under ``examples/`` shares: the command line
(``--seeds 0,1,2``, ``--quick``, ``--write``), mean +- std over seeds, the progress bar, the
protocol line, and its own section of docs/results_training.md.

Sections are written by ``benchmarks/_common.write_section`` (one home for the
``<!-- NAME:start -->`` / ``<!-- NAME:end -->`` section format), pointed at the results file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import mean, stdev

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from prunekit.analysis.report import protocol

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = DOCS / "results_training.md"
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common  # noqa: E402  (benchmarks/_common.py, not a package)

VERDICT = _common.VERDICT


def parser(doc: str) -> argparse.ArgumentParser:
    """The shared options: ``--seeds`` (comma-separated), ``--quick`` (a seconds-long smoke
    run: tiny epochs, one seed) and ``--write`` (put the section into the results file)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="smoke run: seconds, not minutes")
    p.add_argument("--write", action="store_true", help=f"write the section into {RESULTS.name}")
    return p


def setup(args: argparse.Namespace) -> None:
    """One thread (the reproductions run side by side on a small machine); ``--quick``
    keeps one seed."""
    torch.set_num_threads(1)
    if args.quick:
        args.seeds = args.seeds[:1]


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """``"mean +- std"`` of ``values * scale`` (sample std, ddof 1; 0 for one value)."""
    spread = stdev(values) if len(values) > 1 else 0.0
    return f"{scale * mean(values):.{digits}f} +- {scale * spread:.{digits}f}"


def progress() -> Progress:
    """The outer progress bar of a reproduction (one step per training run)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return Progress(*columns, TimeElapsedColumn())


def protocol_line(script: str, what: str) -> str:
    """The exact command (``--write`` included), ``what`` was run, and the software and
    machine (:func:`prunekit.analysis.report.protocol`)."""
    p = protocol()
    cmd = " ".join(["PYTHONPATH=src .venv/bin/python", f"examples/{script}", *sys.argv[1:]])
    return f"`{cmd}` ({what}; torch {p['torch']}, 1 thread, {p['machine']}, {p['date'][:10]})."


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    """A markdown table; ``align`` gives one of ``l r c`` per column (default: first column
    left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    return [
        f"| {' | '.join(header)} |",
        f"|{'|'.join(rule[a] for a in align)}|",
        *(f"| {' | '.join(row)} |" for row in rows),
    ]


def show(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print the result rows as a rich table."""
    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def write(name: str, lines: list[str], args: argparse.Namespace) -> None:
    """With ``--write`` (and not ``--quick``), replace section ``name`` of the results file."""
    if args.write and not args.quick:
        _common.write_section(name, lines, RESULTS)
    elif args.write:
        Console().print("[yellow]--quick: not writing the results file[/]")
