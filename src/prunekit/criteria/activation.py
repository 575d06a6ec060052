"""Activation-aware criterion: Wanda (Sun et al. 2023, "A Simple and Effective Pruning
Approach for Large Language Models").

    S_ij = |W_ij| * ||X_j||_2

with ``X_j`` the j-th input feature of the layer over every calibration token (a running
sum of squares, then a square root). No weight is updated.

The paper compares scores **within each output row** (and, for N:M, within every M
consecutive inputs of a row). :func:`prunekit.llm.prune` with ``method="wanda"`` does
exactly that, block by block. Through :func:`prunekit.prune` the :class:`Wanda` criterion
follows prunekit's scopes instead: with ``granularity="2:4"`` it is the paper's N:M
Wanda; with ``"element"`` and local scope it ranks a whole layer at once (one threshold
per layer), which the paper reports as slightly worse than per-row.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prunekit.criteria.base import Criterion, ScoreContext
from prunekit.criteria.units import LayerUnits, Units, UnitSet
from prunekit.errors import MissingDataError
from prunekit.inputs import Calibration, call, eval_mode
from prunekit.layers import Layer, kernel_ndim, layer_hooks


def flat_inputs(x: Tensor) -> Tensor:
    """A Linear / HF Conv1D input ``(..., in)`` as fp32 rows ``(tokens, in)``."""
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float32)


class ColumnNorms:
    """Running ``sum_t x_tj^2`` over calibration tokens; :attr:`norms` is ``||X_j||_2``."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        rows = flat_inputs(x)
        self.sum_sq += rows.square().sum(0)
        self.tokens += rows.shape[0]

    @property
    def norms(self) -> Tensor:
        return self.sum_sq.sqrt()


def wanda_scores(weight: Tensor, norms: Tensor) -> Tensor:
    """``|W| * ||X_j||_2`` (fp32) for a canonical ``(out, in)`` weight; ``norms`` is ``(in,)``
    or already broadcast to the weight's shape."""
    return weight.detach().abs().to(torch.float32) * norms.to(weight.device)


class Wanda(Criterion):
    """Wanda scores ``|W_ij| * ||X_j||_2`` for Linear-like layers.

    :meth:`prepare` is the statistics pass of :func:`prunekit.prune`: forward hooks
    collect each layer's input column norms over the calibration inputs (targets, if any,
    are ignored). :func:`prunekit.llm.prune` gathers the same norms block by block and
    calls :meth:`scores` with them. Convolutions are rejected: the score is defined per
    input feature. Any granularity sums the scores per group (element, N:M, block...).
    """

    name = "wanda"
    requires_data = True
    per_group_stats = False  # ctx.stats: the layer's input norms (in,)
    units = frozenset({"groups", "rows"})

    def incompatibility(self, layer: Layer) -> str | None:
        if kernel_ndim(layer.module) or isinstance(layer.module, nn.Embedding):
            return (
                "Wanda scores Linear-like layers only; Fix: exclude it or select layers=nn.Linear."
            )
        return None

    def scores(self, units: Units, ctx: ScoreContext) -> Tensor:
        assert ctx.stats is not None, "Wanda needs the layer's input norms"
        return units.sum(lambda w, g: wanda_scores(w, ctx.stats))

    def prepare(
        self, model: nn.Module, units: UnitSet, data: Calibration | None
    ) -> dict[str, Tensor]:
        assert isinstance(units, LayerUnits), "Wanda's statistics pass hooks pk.prune's layers"
        layers = units.layers
        if data is None:
            raise MissingDataError(
                "criterion 'wanda' needs calibration batches; Fix: pass data=[inputs, ...]."
            )
        stats = {ly.name: ColumnNorms(ly.canonical.shape[1], ly.weight.device) for ly in layers}
        hooks = layer_hooks(layers, lambda ly, x, out: stats[ly.name].add(x))
        with eval_mode(model), torch.no_grad(), hooks:
            for inputs in data.inputs():
                call(model, inputs)
        if any(s.tokens == 0 for s in stats.values()):
            raise MissingDataError("criterion 'wanda' got an empty data iterable")
        return {name: s.norms for name, s in stats.items()}
