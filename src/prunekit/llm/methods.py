"""The per-layer pruning step of each method, on a block's statistics.

==========  ==========================================  =====================  ===============
method      score (higher = keep)                       compared within        weights updated
==========  ==========================================  =====================  ===============
magnitude   ``|W_ij|``                                  the layer (one         no
                                                        threshold), via
                                                        :func:`prunekit.prune`
wanda       ``|W_ij| * ||X_j||_2`` (Sun et al. 2023)    each output row        no
sparsegpt   ``w^2 / [H^-1]_jj`` during the OBS sweep    each 128-column block  yes (kept ones)
            (Frantar & Alistarh 2023)
==========  ==========================================  =====================  ===============

With an N:M target every method keeps the N best of every M consecutive inputs of each
row (the layout of NVIDIA's sparse tensor cores).
"""

from __future__ import annotations

import torch

from prunekit import granularity as granularity_mod
from prunekit.allocation import check_sparsity
from prunekit.criteria.activation import wanda_row_mask, wanda_scores
from prunekit.errors import InvalidSparsityError, UnknownChoiceError
from prunekit.granularity import NM, NM2D
from prunekit.layers import Layer, from_canonical, to_canonical, weight_param
from prunekit.llm.engine import LayerStats
from prunekit.llm.sparsegpt import sparsegpt
from prunekit.masks import apply_mask
from prunekit.pruning import prune as prune_layers

Target = float | NM
METHODS = {
    "magnitude": frozenset(),
    "wanda": frozenset({"norms"}),
    "sparsegpt": frozenset({"hessian"}),
}


def parse_method(method: str) -> str:
    """The method name, lower-cased, or :class:`UnknownChoiceError`."""
    key = method.strip().lower() if isinstance(method, str) else method
    if key not in METHODS:
        raise UnknownChoiceError("method", method, list(METHODS))
    return key


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


def prune_layer(method: str, layer: Layer, target: Target, stats: LayerStats) -> None:
    """Prune one layer in place (masks through :func:`prunekit.masks.apply_mask`)."""
    module = layer.module
    if method == "magnitude":
        if isinstance(target, NM):
            prune_layers(module, granularity=target)
        else:
            prune_layers(module, target)
        return
    weight = to_canonical(module, module.weight.detach())
    if method == "wanda":
        assert stats.norms is not None
        scores = wanda_scores(weight, stats.norms.norms)
        keep = target.keep(scores) if isinstance(target, NM) else wanda_row_mask(scores, target)
    else:
        assert stats.hessian is not None
        new_weight, keep = sparsegpt(weight, stats.hessian.hessian, target)
        with torch.no_grad():
            stored = weight_param(module)
            stored.copy_(from_canonical(module, new_weight).to(stored.dtype))
    apply_mask(module, from_canonical(module, keep))
