"""Sections: which weights go (criteria, chapter 3.4) and where (scope and allocation,
chapter 3.2.2).

Criteria: on LeNet-300-100, 90% of single weights by magnitude, gradient, Taylor
``|w g|`` and random (global scope), and 50% of the neurons (rows) by L1, L2, Taylor and
random (local scope), the classifier kept dense (the default). Scope: 95% by magnitude
with every layer, the classifier included, at 95% (local), one global ranking, or
per-layer sparsities from a sensitivity analysis (:func:`prunekit.analysis.sensitivity`),
with each model's per-layer density.
"""

from __future__ import annotations

import contextlib

from prunekit.analysis import SensitivityReport, plots, sensitivity
from prunekit.analysis.report import Section
from prunekit.demo.context import Context
from prunekit.errors import PruningError
from prunekit.masks import sparsity as layer_sparsity

ELEMENT = ("magnitude", "gradient", "taylor", "random")
ROW = ("l1", "l2", "taylor", "random")
SCOPE_SPARSITY = 0.95
CRITERIA_TEXT = (
    "LeNet-300-100 pruned with each criterion and fine-tuned once: 90% of the weights one "
    "by one (global scope), and 50% of the neurons (rows; local), the classifier kept dense "
    "(the default). Gradient "
    "and Taylor scores use 4 calibration batches of 64 images. Random is the baseline every "
    "criterion must beat."
)
GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
SCOPE_TEXT = (
    "95% sparsity by magnitude, three ways. Local scope cuts every layer to 95%. Global "
    "scope ranks all weights together, so the large fc1 takes most of the cut and the small "
    "classifier keeps more. The sensitivity analysis prunes each layer alone over a grid "
    "(the curves) and allocates per-layer sparsities from it: the tightest measured accuracy "
    "drop that still reaches 95% overall. The bars show each model's per-layer density."
)


def criteria_section(ctx: Context) -> Section:
    """Each criterion at element and row granularity on LeNet-300-100."""
    rows = []
    settings = [("element", 0.9, "global", c) for c in ELEMENT]
    settings += [("row", 0.5, "local", c) for c in ROW]
    for granularity, sparsity, scope, criterion in settings:
        ctx.status(f"criterion {criterion} ({granularity})")
        _, row = ctx.prune_and_finetune(
            ctx.lenet300,
            sparsity,
            granularity=granularity,
            criterion=criterion,
            scope=scope,
        )
        rows.append({"granularity": granularity, "criterion": criterion, "scope": scope, **row})
    return Section("Criteria", CRITERIA_TEXT, rows)


def sensitivity_allocation(report: SensitivityReport, target: float) -> tuple[float, dict]:
    """The tightest budget among the measured drops whose :meth:`SensitivityReport.allocation`
    reaches ``target``, and that allocation. The loosest (the largest drop) always does:
    no grid point is over it, so every layer may reach the top of the grid."""
    *tight, loosest = sorted({max(0.0, d) for ly in report.layers for d in report.drops(ly.name)})
    for budget in tight:
        with contextlib.suppress(PruningError):
            return budget, report.allocation(target, budget)
    return loosest, report.allocation(target, loosest)


def scope_section(ctx: Context) -> Section:
    """Uniform local, global and sensitivity-allocated magnitude pruning at one sparsity."""
    ctx.status("sensitivity analysis")
    report = sensitivity(ctx.lenet300.model, ctx.accuracy, sparsities=GRID, progress=False)
    budget, alloc = sensitivity_allocation(report, SCOPE_SPARSITY)
    # Every layer, the classifier too (include_output): the chapter's setup (Han et al.
    # 2015 prune all of LeNet-300-100), where global scope shows how the classifier fares.
    every = {"include_output": True}
    settings = [  # figure name, scope, allocation, prune arguments
        ("local", "local", "uniform", {"scope": "local", **every}),
        ("global", "global", "one ranking", {"scope": "global", **every}),
        ("sensitivity", "local", f"sensitivity (drop <= {budget:.3f})",
         {"allocation": alloc, "layers": list(alloc), **every}),
    ]  # fmt: skip
    curves = plots.plot_sensitivity(report, budget=budget, ylabel="test accuracy")
    rows, figures = [], {"sensitivity": curves}
    for name, scope, how, kwargs in settings:
        ctx.status(f"{scope} scope, {how}")
        sparsity = None if "allocation" in kwargs else SCOPE_SPARSITY
        model, row = ctx.prune_and_finetune(ctx.lenet300, sparsity, **kwargs)
        layers = layer_sparsity(model, include_output=True).layers
        per_layer = {f"{r.name} sparsity": r.sparsity for r in layers}
        rows.append({"scope": scope, "allocation": how, **row, **per_layer})
        figures[f"density-{name}"] = plots.plot_layer_density(model, label=f"{scope} scope, {how}")
    return Section("Scope and allocation", SCOPE_TEXT, rows, figures)
