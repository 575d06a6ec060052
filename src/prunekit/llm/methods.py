"""The per-layer pruning step of each method, on a block's statistics.

A method is ``"sparsegpt"`` or any criterion of the one registry that scores rows
(:mod:`prunekit.criteria`: ``units`` holds ``"rows"``), by name or as an object:

==========  ==========================================  =====================  ===============
method      score (higher = keep)                       compared within        weights updated
==========  ==========================================  =====================  ===============
magnitude   ``|W_ij|``                                  the layer (one         no
                                                        threshold), via
                                                        :func:`prunekit.prune`
wanda       ``|W_ij| * ||X_j||_2`` (Sun et al. 2023)    each output row        no
any other   ``criterion.scores`` of the layer's weights  each output row        no
criterion   (with the input norms as ``ctx.stats``)
sparsegpt   ``w^2 / [H^-1]_jj`` during the OBS sweep    each 128-column block  yes (kept ones)
            (Frantar & Alistarh 2023)
alps        ADMM on ``||W X - W' X||^2`` then a PCG     the layer              yes (kept ones)
            refit (Meng et al. 2024; :mod:`.alps`)
==========  ==========================================  =====================  ===============

With an N:M target every method keeps the N best of every M consecutive inputs of each
row (the layout of NVIDIA's sparse tensor cores). SparseGPT is not a criterion: it chooses
the mask while updating the remaining weights (see :mod:`prunekit.criteria.second_order`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch

from prunekit import criteria
from prunekit import granularity as granularity_mod
from prunekit.allocation import check_sparsity
from prunekit.criteria import Criterion, ScoreContext
from prunekit.criteria.units import GroupUnits
from prunekit.errors import InvalidSparsityError, UnknownChoiceError
from prunekit.granularity import NM, NM2D, Element
from prunekit.layers import Layer, from_canonical, to_canonical, weight_param
from prunekit.llm.alps import ALPS, alps
from prunekit.llm.engine import LayerStats
from prunekit.llm.sparsegpt import sparsegpt
from prunekit.masks import apply_mask
from prunekit.pruning import prune as prune_layers
from prunekit.selection import row_mask

Target = float | NM
Method = str | Criterion | ALPS | Callable[..., Any]
SPARSEGPT = "sparsegpt"
ALPS_NAME = "alps"  # ALPS() with its defaults; pass ALPS(...) for other settings
LAYER_WIDE = frozenset({"magnitude"})  # compared within the layer, as in the papers' baseline


def methods() -> list[str]:
    """Every method name: the row criteria of the registry, SparseGPT and ALPS."""
    return sorted([*criteria.names("rows"), SPARSEGPT, ALPS_NAME])


def parse_method(method: Method) -> str | Criterion | ALPS:
    """``"sparsegpt"``, ALPS settings (``"alps"``: the defaults), or the criterion (which
    must score rows); else :class:`UnknownChoiceError` listing :func:`methods`."""
    if isinstance(method, ALPS):
        return method
    if isinstance(method, str) and method.strip().lower() == ALPS_NAME:
        return ALPS()
    if isinstance(method, str) and method.strip().lower() == SPARSEGPT:
        return SPARSEGPT
    try:
        return criteria.get(method, units="rows")
    except UnknownChoiceError:
        raise UnknownChoiceError("method", method, methods()) from None


def method_name(method: str | Criterion | ALPS) -> str:
    return method if isinstance(method, str) else repr(method)


def needs(method: str | Criterion | ALPS) -> frozenset[str]:
    """The block statistics a method needs: ``"hessian"`` (SparseGPT), ``"norms"``
    (criteria that need data: the input column norms ``||X_j||_2``)."""
    if method == SPARSEGPT or isinstance(method, ALPS):
        return frozenset({"hessian"})
    assert isinstance(method, Criterion)
    return frozenset({"norms"}) if method.requires_data else frozenset()


def parse_target(sparsity: float | str) -> Target:
    """A fraction in [0, 1), or an N:M pattern written ``"2:4"``."""
    if isinstance(sparsity, str):
        try:
            target = granularity_mod.parse(sparsity)
        except UnknownChoiceError:
            target = None
        if isinstance(target, NM2D):
            raise InvalidSparsityError(
                f"sparsity={sparsity!r}: the one-shot LLM methods choose 1-D N:M masks (N of "
                "every M inputs of a row); Fix: pass 1-D N:M, e.g. '2:4', or prune with "
                f"pk.prune(model, granularity={sparsity!r})."
            )
        if not isinstance(target, NM):
            raise InvalidSparsityError(
                f"sparsity={sparsity!r} is neither a fraction nor an N:M pattern; Fix: pass "
                "e.g. 0.5, '2:4' or '4:8'."
            )
        return target
    return check_sparsity(sparsity)


def describe(target: Target) -> str:
    return target.name if isinstance(target, NM) else f"{target:.0%}"


def _criterion_keep(criterion: Criterion, weight: torch.Tensor, target: Target, stats: LayerStats,
                    name: str) -> torch.Tensor:  # fmt: skip
    """Keep-mask of a row criterion: N of every M inputs, or the best of each row."""
    scores = _criterion_scores(criterion, weight, stats, name)
    return target.keep(scores) if isinstance(target, NM) else row_mask(scores, target)


def _criterion_scores(
    criterion: Criterion, weight: torch.Tensor, stats: LayerStats, name: str
) -> torch.Tensor:
    """fp32 per-weight scores of ``criterion`` (input norms as ``ctx.stats``)."""
    norms = None if stats.norms is None else stats.norms.norms
    ctx = ScoreContext(name, norms, torch.Generator().manual_seed(zlib.crc32(name.encode())))
    score = criteria.guard(criterion, criterion.scores, f"scoring layer {name!r}")
    scores = score(GroupUnits(weight, Element().grouping(tuple(weight.shape))), ctx)
    return scores.to(torch.float32)


def prune_layer(
    method: str | Criterion | ALPS,
    layer: Layer,
    target: Target,
    stats: LayerStats,
    *,
    in_place: bool = False,
) -> None:
    """Prune one layer in place (masks through :func:`prunekit.masks.apply_mask`).
    ``in_place``: nothing references the dense weight (no error meter), so SparseGPT
    sweeps an fp32 Linear weight in its own storage instead of a working copy."""
    module = layer.module
    if isinstance(method, Criterion) and method.name in LAYER_WIDE:
        if isinstance(target, NM):
            prune_layers(module, granularity=target, criterion=method)
        else:
            prune_layers(module, target, criterion=method)
        return
    weight = to_canonical(module, module.weight.detach())
    new_weight, keep = solve(method, weight, target, stats, layer.name, in_place=in_place)
    if new_weight is not None:  # a new tensor, not written into the old one: the error
        stored = weight_param(module)  # meter may still reference the dense weight
        stored.data = from_canonical(module, new_weight).to(stored.dtype).contiguous()
    apply_mask(module, from_canonical(module, keep))


def solve(
    method: str | Criterion | ALPS, weight: torch.Tensor, target: Target, stats: LayerStats,
    name: str, *, in_place: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:  # fmt: skip
    """``(new_weight, keep)`` for a canonical ``(out, in)`` weight named ``name``:
    ``new_weight`` is None for a criterion (the weights stay), the compensated fp32 weight
    for SparseGPT / ALPS (``in_place``: SparseGPT's is ``weight`` itself when that is fp32
    and contiguous). A layer-wide criterion (magnitude) compares the whole matrix."""
    if isinstance(method, Criterion):
        if method.name in LAYER_WIDE and not isinstance(target, NM):
            scores = _criterion_scores(method, weight, stats, name).reshape(1, -1)
            return None, row_mask(scores, target).reshape(weight.shape)
        return None, _criterion_keep(method, weight, target, stats, name)
    assert stats.hessian is not None
    if isinstance(method, ALPS):
        return alps(weight, stats.hessian.hessian, target, method)
    return sparsegpt(weight, take_hessian(stats), target, overwrite=True, in_place=in_place)


def take_hessian(stats: LayerStats) -> torch.Tensor:
    """``H = (2/n) X X^T`` scaled in place in the statistics' own buffer, which ``stats``
    gives up (no second in x in matrix; ``stats`` holds no Hessian afterwards)."""
    accumulator, stats.hessian = stats.hessian, None
    assert accumulator is not None
    return accumulator.hessian_in_place()
