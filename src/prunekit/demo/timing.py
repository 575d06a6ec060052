"""Sections: when to prune (chapter 3.6): after, during or before training, and a lottery
ticket.

At 90% sparsity on LeNet-300-100 (global scope): after training (prune the trained model,
fine-tune), during (a :class:`~prunekit.Pruner` on the cubic schedule of Zhu & Gupta
2017 while training from scratch), before (SNIP, iterative SynFlow or random masks at
initialisation, then training). Soft filter pruning (He et al. 2018) trains LeNet-5 while
zeroing half of each conv's filters every epoch and removes them at the end. The lottery
ticket (Frankle & Carbin 2019; rewinding, Frankle et al. 2020) is searched by iterative
magnitude pruning with its random re-initialisation control.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from prunekit.analysis.report import Section
from prunekit.demo.context import LR, Context, renamed
from prunekit.masks import sparsity
from prunekit.pruner import Pruner
from prunekit.pruning import prune
from prunekit.schedules import Cubic
from prunekit.training import lottery, soft_filter_pruning, synflow_prune, train_with_pruner
from prunekit.training.data import steps_per_epoch
from prunekit.zoo.models import LeNet5

TARGET = 0.9
SFP_RATIO = 0.5
LOTTERY_RATE = 0.6
REWIND_STEP = 5
BATCH = 64
LOTTERY_COLUMNS = {
    "round": "round",
    "remaining": "weights left",
    "best_epoch": "best epoch",
    "accuracy": "acc (early stop)",
    "final_accuracy": "acc (final)",
    "control_accuracy": "random re-init",
}
TIMING_TEXT = (
    "90% of LeNet-300-100's weights (global scope; the classifier kept dense, the default, "
    "and not counted) removed after training (prune, then one "
    "fine-tuning pass), during training from scratch (cubic schedule over the first two "
    "thirds of the steps) or before it (masks chosen at initialisation, then the same "
    "training). Soft filter pruning zeroes the weakest half of LeNet-5's conv filters after "
    "every epoch, lets them regrow, and removes them for good at the end; its sparsity is "
    "the fraction of parameters removed."
)
LOTTERY_TEXT = (
    f"Iterative magnitude pruning, {LOTTERY_RATE:.0%} of the remaining weights per round "
    f"({LOTTERY_RATE / 2:.0%} in the classifier), survivors rewound to theta_{REWIND_STEP} "
    f"(the weights after {REWIND_STEP} optimizer steps) and retrained. Accuracy at the "
    "early-stopping epoch (best on a 10% validation split). The control trains the same "
    "masks from a fresh random initialisation: a winning ticket beats it."
)


def _cubic(ctx: Context) -> Cubic:
    """Prune every twelfth of training, reaching the target after two thirds of it."""
    steps = ctx.budget.train_epochs * steps_per_epoch(ctx.data, BATCH)
    every = max(1, steps // 12)
    return Cubic(start=0, end=8 * every, every=every)


def _during(ctx: Context) -> nn.Module:
    model = ctx.fresh("lenet300")
    pruner = Pruner(model, TARGET, scope="global", schedule=_cubic(ctx))
    epochs = ctx.budget.train_epochs
    train_with_pruner(
        model, ctx.data, pruner, epochs, LR, batch_size=BATCH, seed=ctx.seed, progress=False
    )
    return model


def _before(ctx: Context, prune_at_init: Callable[[nn.Module], object]) -> nn.Module:
    model = ctx.fresh("lenet300")
    prune_at_init(model)
    return ctx.train(model)


def _row(ctx: Context, when: str, method: str, model: nn.Module, epochs: int) -> dict:
    name = "lenet5" if isinstance(model, LeNet5) else "lenet300"
    return {"when": when, "method": method, "model": name, "sparsity": sparsity(model).total,
            "accuracy": ctx.accuracy(model), "training epochs": epochs}  # fmt: skip


def timing_section(ctx: Context) -> Section:
    """The same sparsity reached after, during and before training."""
    epochs = ctx.budget.train_epochs
    ctx.status("after training")
    after, _ = ctx.prune_and_finetune(ctx.lenet300, TARGET, scope="global")
    rows = [_row(ctx, "after", "magnitude + fine-tune", after, epochs + 1)]
    ctx.status("during training: cubic Pruner")
    rows.append(_row(ctx, "during", "gradual magnitude (cubic)", _during(ctx), epochs))
    at_init = {
        "SNIP": lambda m: prune(m, TARGET, criterion="snip", scope="global", data=ctx.calibration),
        "SynFlow": lambda m: synflow_prune(
            m, TARGET, ctx.example[:1], rounds=ctx.budget.synflow_rounds
        ),
        "random": lambda m: prune(m, TARGET, criterion="random", scope="global", seed=ctx.seed),
    }
    for method, fn in at_init.items():
        ctx.status(f"before training: {method}")
        rows.append(_row(ctx, "before", method, _before(ctx, fn), epochs))
    ctx.status("during training: soft filter pruning")
    lenet5 = ctx.fresh("lenet5")
    report = soft_filter_pruning(
        lenet5, ctx.data, ctx.example[:1], ratio=SFP_RATIO, epochs=epochs, seed=ctx.seed
    )
    shrunk = report.shrink
    assert shrunk is not None  # soft_filter_pruning always shrinks
    rows.append({**_row(ctx, "during", "soft filter pruning", lenet5, epochs),
                 "sparsity": 1 - shrunk.params_ratio})  # fmt: skip
    return Section("When to prune", TIMING_TEXT, rows)


def lottery_section(ctx: Context) -> Section:
    """A short lottery-ticket search with rewinding and its random re-init control."""
    ctx.status("lottery ticket")
    report = lottery(
        lambda: ctx.fresh("lenet300"),
        ctx.data,
        rounds=ctx.budget.lottery_rounds,
        rate=LOTTERY_RATE,
        rewind=REWIND_STEP,
        epochs=ctx.budget.train_epochs,
        lr=LR,
        seed=ctx.seed,
        include_output=True,  # Frankle & Carbin prune the classifier at half the rate
    )
    rows = [renamed(r, LOTTERY_COLUMNS) for r in report.rounds]
    return Section("Lottery ticket", LOTTERY_TEXT, rows)
