"""A recipe's dry run: every model-specific check, as a chain of plans, before training.

Nothing here changes the model or copies it. The prune is planned
(:func:`prunekit.pruning.plan`: layers, groupings, targets, the criterion's fit), a
schedule by building its :class:`~prunekit.Pruner` (which plans too), a structured
method's removal by :func:`prunekit.structured.plan` on a read-only trace, a shrink by
tracing the dependency graph, and each sparse format on a copy of one layer at a time
masked as planned (:func:`check_sparse`). Errors come back at the ``prune`` or
``materialize`` line of the recipe.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunekit import pruning, sparse, structured, training
from prunekit.errors import PruningError
from prunekit.export import SPARSE
from prunekit.granularity import NM
from prunekit.layers import select_layers
from prunekit.pruning import PrunePlan
from prunekit.recipes.validate import Recipe
from prunekit.spec import PruneSpec
from prunekit.training.configs import AtInit, Lottery, Scheduled, Slimming, SoftFilter

SPARSE_FORMATS = tuple(f for f in SPARSE if f != "auto")  # auto falls back to dense: never fails
PRUNE_FIX = "exclude the layer it names (prune.exclude) or choose another setting."


def _structural(recipe: Recipe, model: nn.Module, example: object) -> None:
    """Plan a soft filter pruning or slimming removal on the dense model."""
    cfg = recipe.config
    if isinstance(cfg, Slimming):
        with torch.no_grad():
            training.during.bn_l1(model)  # a model without BatchNorm has nothing to slim
    soft = isinstance(cfg, SoftFilter)
    criterion, scope = (cfg.criterion, "local") if soft else ("bn_scale", "global")
    graph = structured.build(model, example)
    structured.plan(graph, structured.score(model, graph, criterion), cfg.sparsity, scope)


def spec(recipe: Recipe) -> PruneSpec | None:
    """The :class:`~prunekit.PruneSpec` the recipe's method prunes with (None: a
    structured method, which ranks channel families instead)."""
    cfg = recipe.config
    if isinstance(cfg, SoftFilter | Slimming):
        return None
    if isinstance(cfg, Lottery):
        ends = {"include_output": cfg.include_output, "include_embeddings": cfg.include_embeddings}
        return PruneSpec(**cfg.fixed, **ends, seed=recipe["seed"])
    if isinstance(cfg, AtInit) and cfg.schedule == "iterative":
        return cfg.spec.replace(scope="global")  # iterative SynFlow ranks all layers together
    assert isinstance(cfg, Scheduled | AtInit)
    return cfg.spec


def prune_plan(recipe: Recipe, model: nn.Module, example: object, data: object) -> PrunePlan | None:
    """The plan of the recipe's prune (None for the structured methods, planned here too)."""
    prune_spec = spec(recipe)
    if prune_spec is None:
        _structural(recipe, model, example)
        return None
    plan = pruning.plan(model, recipe.config.sparsity, prune_spec)
    plan.check_data(data)
    return plan


def _holder(name: str, layer: nn.Module) -> nn.Module:
    """A module holding only ``layer``, at its qualified ``name`` (so errors name it)."""
    root = parent = nn.Module()
    *path, last = name.split(".")
    for part in path:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(last, layer)
    return root


def _target(plan: PrunePlan, name: str) -> float | None:
    gran = plan.spec.gran
    if isinstance(gran, NM):
        return None
    return plan.targets[name] if plan.targets is not None else plan.sparsity


def check_sparse(model: nn.Module, plan: PrunePlan | None, fmt: str) -> None:
    """Convert every layer to ``fmt`` as the run will after pruning by ``plan`` (None: the
    layers stay dense, e.g. shrunk); raises what :func:`prunekit.sparse.convert` would."""
    planned = {ly.name for ly in plan.layers} if plan is not None else set()
    for layer in select_layers(model):
        # A format's fit depends on the pruned weight's values (how many nonzeros, where),
        # so it is tried on a copy of this one layer masked as planned: at most one layer's
        # bytes at a time, never the model. Magnitude stands in for the criterion (the
        # pattern and count of the mask, all a format depends on, are the granularity's).
        holder = _holder(layer.name, copy.deepcopy(layer.module))  # one layer: see above
        if plan is not None and layer.name in planned:
            # the one layer was chosen by the plan already: the stand-in prunes it whatever it is
            stand_in = PruneSpec(granularity=plan.spec.gran, min_keep=plan.spec.min_keep,
                                 include_output=True, include_embeddings=True)  # fmt: skip
            pruning.prune(holder, _target(plan, layer.name), spec=stand_in)
        sparse.convert(holder, fmt)


def dry_run(recipe: Recipe, model: nn.Module, example: object, data: object) -> None:
    """Plan the recipe's pruning and materialisation on ``model`` (see the module
    docstring); the first model-specific error at its recipe line."""
    try:
        plan = prune_plan(recipe, model, example, data)
    except PruningError as err:
        prune = recipe["prune"]
        raise recipe.fail(("prune",), prune, f"fails on the model: {err}", PRUNE_FIX) from err
    m, cfg = recipe["materialize"], recipe.config
    formats = [f for f in recipe["export"]["formats"] if f in SPARSE_FORMATS]
    formats += [m["format"]] if m["mode"] == "sparse" and m["format"] != "auto" else []
    dense = m["mode"] == "shrink" or cfg.shrinks
    try:
        if m["mode"] == "shrink" and not cfg.shrinks:
            structured.build(model, example)  # a read-only trace of the dependency graph
        for fmt in dict.fromkeys(formats):
            check_sparse(model, None if dense else plan, fmt)
    except PruningError as err:
        raise recipe.fail(("materialize",), m, f"fails on the model: {err}", PRUNE_FIX) from err
