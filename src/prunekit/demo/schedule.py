"""Section: one-shot vs iterative pruning (chapter 3.5; Han et al. 2015).

Both reach 97% global magnitude sparsity on LeNet-300-100 with the same fine-tuning
budget: one-shot prunes once and fine-tunes ``ROUNDS`` times;
:func:`prunekit.training.iterative_pruning` prunes in ``ROUNDS`` geometric steps, one
fine-tuning pass after each.
"""

from __future__ import annotations

import dataclasses

from prunekit.analysis.report import Section
from prunekit.demo.context import FINETUNE_LR, Context, renamed
from prunekit.training import iterative_pruning

TARGET = 0.97
ROUNDS = 3
COLUMNS = {
    "round": "round",
    "sparsity": "sparsity",
    "pruned_accuracy": "acc pruned",
    "retrained_accuracy": "acc fine-tuned",
}
TEXT = (
    "97% of LeNet-300-100's weights by global magnitude (the classifier kept dense, the "
    "default), with the same fine-tuning budget "
    f"({ROUNDS} passes): all at once, or in {ROUNDS} rounds of prune + fine-tune "
    "(s_k = 1 - (1 - 0.97)^(k/3)). Iterative pruning lets the survivors adapt before the "
    "next cut."
)


def section(ctx: Context) -> Section:
    """One-shot then ``ROUNDS`` fine-tunings vs ``ROUNDS`` prune / fine-tune rounds."""
    ctx.status("one-shot pruning")
    model, row = ctx.prune_and_finetune(ctx.lenet300, TARGET, scope="global")
    for k in range(1, ROUNDS):
        row["acc fine-tuned"] = ctx.finetune(model, ctx.seed + k)
    rows = [{"method": "one-shot", "round": 1, **row}]
    ctx.status("iterative pruning")
    x, y = ctx.finetune_data
    data = dataclasses.replace(ctx.data, x_train=x, y_train=y)
    report = iterative_pruning(
        ctx.copy(ctx.lenet300),
        data,
        target=TARGET,
        rounds=ROUNDS,
        epochs=ctx.budget.finetune_epochs,
        finetune_lr=FINETUNE_LR,
        seed=ctx.seed,
        scope="global",  # as the one-shot row above
        progress=False,
    )
    rows += [{"method": "iterative", **renamed(r, COLUMNS)} for r in report.rounds]
    return Section("One-shot vs iterative", TEXT, rows)
