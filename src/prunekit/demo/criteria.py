"""Sections: which weights go (criteria, chapter 3.3) and where (scope, chapter 3.4).

Criteria: on LeNet-300-100, 90% of single weights by magnitude, gradient, Taylor
``|w g|`` and random (global scope), and 50% of the neurons (rows) by L1, L2, Taylor and
random (local scope, the classifier kept). Scope: 95% by magnitude with one global
ranking against every layer at 95% (local), with each model's per-layer density.
"""

from __future__ import annotations

from prunekit.analysis import plots
from prunekit.analysis.report import Section
from prunekit.demo.context import Context
from prunekit.demo.granularity import exclusions
from prunekit.masks import sparsity as layer_sparsity

ELEMENT = ("magnitude", "gradient", "taylor", "random")
ROW = ("l1", "l2", "taylor", "random")
SCOPE_SPARSITY = 0.95
CRITERIA_TEXT = (
    "LeNet-300-100 pruned with each criterion and fine-tuned once: 90% of the weights one "
    "by one (global scope), and 50% of the neurons (rows; local, classifier kept). Gradient "
    "and Taylor scores use 4 calibration batches of 64 images. Random is the baseline every "
    "criterion must beat."
)
SCOPE_TEXT = (
    "95% sparsity by magnitude. Global scope ranks all weights together, so the large "
    "fc1 takes most of the cut and the small classifier keeps more; local scope cuts every "
    "layer to 95%. The bars show each model's per-layer density."
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
            exclude=exclusions(granularity),
        )
        rows.append({"granularity": granularity, "criterion": criterion, "scope": scope, **row})
    return Section("Criteria", CRITERIA_TEXT, rows)


def scope_section(ctx: Context) -> Section:
    """Local vs global magnitude pruning at the same overall sparsity."""
    rows, figures = [], {}
    for scope in ("local", "global"):
        ctx.status(f"{scope} scope")
        model, row = ctx.prune_and_finetune(ctx.lenet300, SCOPE_SPARSITY, scope=scope)
        per_layer = {f"{r.name} sparsity": r.sparsity for r in layer_sparsity(model).layers}
        rows.append({"scope": scope, **row, **per_layer})
        figures[f"density-{scope}"] = plots.plot_layer_density(model, label=f"{scope} scope")
    return Section("Scope: local vs global", SCOPE_TEXT, rows, figures)
