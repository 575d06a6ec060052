"""``run_demo``: train, run every section, print its table, write the report."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console

from prunekit.analysis.report import Section, rich_table, write_report
from prunekit.demo import criteria, curves, granularity, savings, schedule, timing
from prunekit.demo.context import DATASET, FULL, QUICK, Context
from prunekit.tables import progress_bar

REPORT = "demo"
TITLE = "prunekit demo: the chapter's practice on MNIST (LeNet-300-100, LeNet-5)"
SECTIONS: tuple[Callable[[Context], Section], ...] = (
    granularity.section,
    criteria.criteria_section,
    criteria.scope_section,
    curves.section,
    schedule.section,
    timing.timing_section,
    timing.lottery_section,
    savings.shrink_section,
    savings.nm_section,
)
DENSE_TEXT = (
    "Both LeNets trained once from scratch with Adam on the mnist5k training images; "
    "every section below prunes copies of them. Accuracy on the 1,000 test images; "
    "latency of a batch of test images on one thread."
)


def wide_console() -> Console:
    """A console for the demo's wide tables: the terminal's width, or 160 columns when
    the output is a file or a pipe (rich would otherwise squeeze them into 80)."""
    return Console(width=None if sys.stdout.isatty() else 160)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the body with one intra-op thread, then restore the previous count.

    The models are tiny, so one thread trains them about as fast as two, and on a busy
    machine it keeps workers that wait for a core out of the latency measurements.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dense_section(ctx: Context) -> Section:
    """The two trained models: size, MACs, latency, accuracy, training time."""
    rows = []
    models = (ctx.lenet300, ctx.lenet5)
    for trained, (prof, ms) in zip(models, ctx.measure([t.model for t in models]), strict=True):
        rows.append({
            "model": trained.name,
            "params": prof.total.params,
            "MACs": prof.total.macs,
            "latency ms": ms,
            "accuracy": trained.accuracy,
            "training s": trained.seconds,
        })  # fmt: skip
    return Section("Dense models", DENSE_TEXT, rows)


def run_demo(
    quick: bool = False,
    out_dir: Path = Path("runs"),
    seed: int = 0,
    console: Console | None = None,
    device: torch.device | str = "cpu",
) -> Path:
    """Run the chapter's practice on ``device`` and write ``<out_dir>/demo/`` (report.html,
    report.md, figures, CSV / JSON; see :func:`prunekit.analysis.write_report`); return
    that folder.

    Every section prints its table as it finishes, under one progress bar. ``quick`` runs
    the same path on a small budget (:data:`~prunekit.demo.context.QUICK`) in seconds.
    Runs on one thread (see :func:`single_threaded`); nothing is cached on disk.
    """
    console = console or wide_console()
    budget = QUICK if quick else FULL
    progress = progress_bar(console=console)
    sections = []
    with single_threaded(), progress as bar:
        task = bar.add_task("demo", total=len(SECTIONS) + 1)

        def status(text: str) -> None:
            bar.update(task, description=text)

        ctx = Context(budget, seed, status, device)
        for make in (dense_section, *SECTIONS):
            sections.append(make(ctx))
            console.print(rich_table(sections[-1]))
            bar.advance(task)
        status("writing the report")
        data = f"{DATASET}: {len(ctx.data.x_train)} training / {len(ctx.data.x_test)} test images"
        folder = write_report(
            REPORT, title=TITLE, sections=sections, out_dir=out_dir, seed=seed, data=data
        )
    console.print(f"report: {(folder / 'report.html').resolve()}", soft_wrap=True)
    return folder
