"""Section: accuracy vs sparsity (chapter 3.7), with the random baseline, over seeds.

:func:`prunekit.analysis.sweep` on LeNet-300-100: global magnitude over every layer, L2
rows (local, classifier kept dense, the default) and the random baseline it adds, each point
fine-tuned once. Seed 0 of the sweep is the demo's trained model; every further seed
trains a new one.
"""

from __future__ import annotations

from torch import nn

from prunekit.analysis import plots, sweep
from prunekit.analysis.report import Section
from prunekit.demo.context import Context, renamed

METHODS = {  # global magnitude over every layer, the classifier too: Han et al. 2015's setup
    "magnitude (global)": {"scope": "global", "include_output": True},
    "L2 rows (local)": {"granularity": "row", "criterion": "l2"},
}
COLUMNS = {
    "method": "method",
    "sparsity": "sparsity",
    "seeds": "seeds",
    "metric_mean": "accuracy",
    "metric_std": "accuracy std",
    "compression_mean": "compression",
    "theoretical_speedup_mean": "theor. speed-up",
    "measured_speedup_mean": "meas. speed-up",
    "measured_speedup_std": "meas. speed-up std",
}
TEXT = (
    "LeNet-300-100 pruned to each sparsity and fine-tuned once, mean and std over seeds "
    "(one trained model per seed). Random pruning collapses first: that gap is what a "
    "criterion buys. Compression is dense params / nonzeros; the theoretical speed-up, "
    "dense MACs / effective MACs, is what a sparse kernel could reach, while the measured "
    "one (dense / pruned median latency over interleaved turns, pk.analysis.speedup; mean "
    "and std over seeds) stays ~1x because masked zeros still run dense kernels."
)


def section(ctx: Context) -> Section:
    """Sweep LeNet-300-100 and plot accuracy vs sparsity with error bands."""
    seeds = [ctx.seed + k for k in range(ctx.budget.sweep_seeds)]

    def build_and_train(seed: int) -> nn.Module:
        if seed == ctx.seed:
            return ctx.copy(ctx.lenet300)
        return ctx.train_new("lenet300", seed).model

    def finetune(model: nn.Module, seed: int) -> None:
        ctx.status(f"sweep: fine-tuning (seed {seed})")
        ctx.finetune(model, seed)

    report = sweep(
        build_and_train,
        ctx.accuracy,
        methods=METHODS,
        sparsities=ctx.budget.sweep_sparsities,
        seeds=seeds,
        example_inputs=ctx.example,
        finetune=finetune,
        min_run_time=ctx.budget.min_run_time,
        progress=False,
    )
    rows = [renamed(row, COLUMNS) for row in report.summary()]
    figure = plots.plot_accuracy_vs_sparsity(report.curves(), ylabel="LeNet-300-100 test accuracy")
    return Section("Accuracy vs sparsity", TEXT, rows, {"accuracy-vs-sparsity": figure})
