"""The chapter's practice as one command: prune two trained LeNets every applicable way.

For LeNet-300-100 (flat mnist5k) and LeNet-5 (image mnist5k), each trained once, every
granularity that applies to the model is crossed with the criteria magnitude, l2 and
taylor and a few sparsities. Each setting prunes a copy of the trained model, fine-tunes
it briefly and measures accuracy, nonzero weights, MACs and latency. A dense row and a
random-criterion row give the baselines. The results go to a rich table, ``demo.md`` and
``demo.csv``.
"""

from __future__ import annotations

import copy
import csv
import itertools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn

import prunekit as pk
from prunekit import zoo

FINE = (0.5, 0.7, 0.9)
STRUCTURED = (0.3, 0.5, 0.7)
CRITERIA = ("magnitude", "l2", "taylor")
# Groups of these granularities would cut whole classes out of the final classifier.
KEEP_CLASSIFIER = frozenset({"row", "column", "filter", "channel"})
CLASSIFIER = "fc3"

COLUMNS = (
    "model",
    "granularity",
    "criterion",
    "sparsity",
    "acc pruned",
    "acc fine-tuned",
    "nonzero/params",
    "MACs",
    "eff. MACs",
    "latency ms",
)
CAPTION = (
    "Accuracy on the 1,000 mnist5k test images; latency of a batch of 1 on one thread, masks "
    "baked. "
    "Masked zeros do not make dense kernels faster: the zeros are still multiplied, so MACs "
    "and latency stay ~flat. Eff. MACs is what a sparse kernel could reach: pk.shrink "
    "removes filter/channel groups physically, pk.sparse.convert runs CSR / BSR / N:M."
)


class Setting(NamedTuple):
    """One pruning run; ``sparsity`` None means fixed by the pattern (N:M)."""

    granularity: str
    criterion: str
    sparsity: float | None


class ModelPlan(NamedTuple):
    """A zoo model, whether it takes flat inputs, and its ``(granularity, sparsities)``."""

    name: str
    flat: bool
    granularities: tuple[tuple[str, tuple[float | None, ...]], ...]


PLANS = (
    ModelPlan(
        "lenet300",
        True,
        (
            ("element", FINE),
            ("2:4", (None,)),
            ("row", STRUCTURED),
            ("column", STRUCTURED),
            ("block:2x2", FINE),
        ),
    ),
    ModelPlan(
        "lenet5",
        False,
        (
            ("element", FINE),
            ("2:4", (None,)),  # conv1 and conv2 (1 and 6 inputs) are skipped: 4 divides neither
            ("kernel", STRUCTURED),  # convs only: the Linear layers are skipped
            ("filter", STRUCTURED),
            ("channel", STRUCTURED),
        ),
    ),
)
DENSE = Setting("dense", "-", 0.0)
RANDOM = Setting("element", "random", 0.9)


@dataclass(frozen=True)
class Budget:
    """How much work the demo does: dense training, fine-tuning and latency timing."""

    train_images: int
    train_epochs: int
    finetune_images: int
    min_run_time: float


FULL = Budget(train_images=4000, train_epochs=3, finetune_images=4000, min_run_time=0.05)
QUICK = Budget(train_images=1000, train_epochs=1, finetune_images=256, min_run_time=0.01)


@dataclass(frozen=True)
class DemoRow:
    """The outcome of one setting; ``acc_finetuned`` is None for the dense baseline."""

    model: str
    granularity: str
    criterion: str
    sparsity: float
    acc_pruned: float
    acc_finetuned: float | None
    nonzero: int
    params: int
    macs: int
    effective_macs: float
    latency_ms: float


@dataclass(frozen=True)
class Trained:
    """A trained model with the data every run of it uses."""

    name: str
    model: nn.Module
    data: zoo.Dataset
    calibration: list[tuple[Tensor, Tensor]]
    finetune: tuple[Tensor, Tensor]


def settings(plan: ModelPlan, quick: bool = False) -> list[Setting]:
    """The dense and random baselines, then granularity x criterion x sparsity.

    ``quick`` keeps the first two granularities, magnitude and taylor, and the highest
    sparsity of each.
    """
    granularities = plan.granularities[:2] if quick else plan.granularities
    criteria = ("magnitude", "taylor") if quick else CRITERIA
    runs = [DENSE, RANDOM]
    for (granularity, sparsities), criterion in itertools.product(granularities, criteria):
        chosen = sparsities[-1:] if quick else sparsities
        runs += [Setting(granularity, criterion, s) for s in chosen]
    return runs


def train_dense(plan: ModelPlan, budget: Budget, seed: int) -> Trained:
    """Train ``plan``'s model with Adam on the first ``budget.train_images`` of mnist5k."""
    data = zoo.load_dataset("mnist5k", flat=plan.flat)
    torch.manual_seed(seed)
    model = zoo.build_model(plan.name)
    subset = (data.x_train[: budget.train_images], data.y_train[: budget.train_images])
    zoo.train(model, subset, epochs=budget.train_epochs, lr=1e-3, seed=seed, progress=False)
    finetune = (data.x_train[: budget.finetune_images], data.y_train[: budget.finetune_images])
    calibration = zoo.calibration_batches(data, n_batches=4, batch_size=64, seed=seed)
    return Trained(plan.name, model, data, calibration, finetune)


def _accuracy(model: nn.Module, trained: Trained) -> float:
    return zoo.evaluate(model, trained.data.x_test, trained.data.y_test)


def prune(
    model: nn.Module, setting: Setting, calibration: list[tuple[Tensor, Tensor]], seed: int
) -> pk.PruneReport:
    """Prune ``model`` in place as ``setting`` says: global scope for element, local for
    the rest, and the classifier left whole by granularities that would cut classes."""
    return pk.prune(
        model,
        setting.sparsity,
        granularity=setting.granularity,
        criterion=setting.criterion,
        scope="global" if setting.granularity == "element" else "local",
        exclude=[CLASSIFIER] if setting.granularity in KEEP_CLASSIFIER else None,
        data=calibration,
        seed=seed,
    )


def _prune_and_finetune(
    model: nn.Module, trained: Trained, setting: Setting, seed: int
) -> tuple[float, float, float]:
    """Prune ``model`` in place, fine-tune it for one pass over the fine-tuning images.

    Returns the target sparsity and the accuracies after pruning and after fine-tuning.
    """
    report = prune(model, setting, trained.calibration, seed)
    acc_pruned = _accuracy(model, trained)
    zoo.train(model, trained.finetune, epochs=1, lr=1e-4, seed=seed + 1, progress=False)
    return report.target, acc_pruned, _accuracy(model, trained)


def run_setting(trained: Trained, setting: Setting, budget: Budget, seed: int) -> DemoRow:
    """Prune and fine-tune a copy of the trained model (the dense row only evaluates it),
    then profile the baked copy on one test image."""
    model = copy.deepcopy(trained.model)
    if setting == DENSE:
        sparsity, acc_pruned, acc_finetuned = 0.0, _accuracy(model, trained), None
    else:
        sparsity, acc_pruned, acc_finetuned = _prune_and_finetune(model, trained, setting, seed)
    prof = pk.analysis.profile(
        pk.bake(model), trained.data.x_test[:1], min_run_time=budget.min_run_time
    )
    return DemoRow(
        model=trained.name,
        granularity=setting.granularity,
        criterion=setting.criterion,
        sparsity=sparsity,
        acc_pruned=acc_pruned,
        acc_finetuned=acc_finetuned,
        nonzero=prof.total.nonzero,
        params=prof.total.params,
        macs=prof.total.macs,
        effective_macs=prof.total.effective_macs,
        latency_ms=prof.latency_s * 1e3,
    )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def cells(row: DemoRow) -> tuple[str, ...]:
    """``row`` formatted for display, one string per entry of :data:`COLUMNS`."""
    return (
        row.model,
        row.granularity,
        row.criterion,
        f"{row.sparsity:.2f}",
        _percent(row.acc_pruned),
        _percent(row.acc_finetuned),
        f"{row.nonzero:,}/{row.params:,}",
        f"{row.macs / 1e3:,.1f}K",
        f"{row.effective_macs / 1e3:,.1f}K",
        f"{row.latency_ms:.3f}",
    )


def table(rows: list[DemoRow]) -> Table:
    """The results as a rich table, a section per model, captioned with :data:`CAPTION`."""
    result = Table(title="prunekit demo", caption=CAPTION)
    for column in COLUMNS:
        result.add_column(column, justify="left" if column in COLUMNS[:3] else "right")
    for i, row in enumerate(rows):
        if i and row.model != rows[i - 1].model:
            result.add_section()
        result.add_row(*cells(row))
    return result


def markdown(rows: list[DemoRow]) -> str:
    """The results as a Markdown table followed by the caption."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|",
        *("| " + " | ".join(cells(row)) + " |" for row in rows),
    ]
    return "\n".join([*lines, "", CAPTION, ""])


def write_results(rows: list[DemoRow], out_dir: Path) -> None:
    """Write ``demo.md`` (the displayed table) and ``demo.csv`` (raw values) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.md").write_text(markdown(rows))
    with (out_dir / "demo.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(DemoRow)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


def wide_console() -> Console:
    """A console for the demo's wide table: the terminal's width, or 160 columns when
    the output is a file or a pipe (rich would otherwise squeeze it into 80)."""
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


def run_demo(
    quick: bool = False, out_dir: Path = Path("runs"), seed: int = 0, console: Console | None = None
) -> list[DemoRow]:
    """Train both LeNets, run every setting of :func:`settings` on them, print the table
    and write it to ``out_dir``. ``quick`` is a seconds-long smoke test of the same path.

    Runs on one thread (see :func:`single_threaded`); nothing is cached on disk.
    """
    console = console or wide_console()
    budget = QUICK if quick else FULL
    jobs = [(plan, settings(plan, quick)) for plan in PLANS]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    rows: list[DemoRow] = []
    progress = Progress(*columns, TimeElapsedColumn(), console=console, transient=True)
    with single_threaded(), progress as bar:
        task = bar.add_task("demo", total=sum(len(runs) for _, runs in jobs))
        for plan, runs in jobs:
            bar.update(task, description=f"training {plan.name}")
            trained = train_dense(plan, budget, seed)
            for setting in runs:
                bar.update(task, description=f"{plan.name} {' '.join(map(str, setting))}")
                rows.append(run_setting(trained, setting, budget, seed))
                bar.advance(task)
    console.print(table(rows))
    write_results(rows, Path(out_dir))
    return rows
