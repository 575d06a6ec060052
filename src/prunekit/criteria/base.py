"""The criterion interface: how important each group of weights is (higher = keep).

A criterion turns one chunk of a layer's canonical weight into one score per group::

    class MyCriterion(pk.criteria.Criterion):
        name = "cube"
        def group_scores(self, weight, grouping, ctx):
            return grouping.groups(weight.abs() ** 3).sum(-1)

or, for an element-wise score reduced by a sum over each group, just a function::

    pk.prune(model, 0.5, criterion=lambda w: w.abs() ** 3)

Data-driven criteria (``requires_data = True``) first see batches through
:meth:`Criterion.prepare` and keep per-group statistics in the returned dict, which the
engine slices per chunk into ``ctx.stats``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prunekit.errors import PruningError
from prunekit.granularity import Grouping
from prunekit.layers import Layer


@dataclass
class ScoreContext:
    """What a criterion may need besides the weight chunk.

    ``stats`` is the criterion's own statistic for exactly this chunk's groups (from
    :meth:`Criterion.prepare`), ``generator`` a seeded RNG private to this layer.
    """

    layer: Layer
    stats: Tensor | None
    generator: torch.Generator


Batches = Iterable[Any]
LossFn = Callable[[Tensor, Any], Tensor]


class Criterion:
    """Base class of all criteria. Subclasses implement :meth:`group_scores`."""

    name: ClassVar[str] = "criterion"
    requires_data: ClassVar[bool] = False

    def prepare(
        self,
        model: nn.Module,
        layers: list[Layer],
        groupings: dict[str, Grouping],
        data: Batches | None,
        loss_fn: LossFn | None,
    ) -> dict[str, Tensor]:
        """Collect statistics (per layer, shaped ``grouping.group_shape``). Default: none."""
        return {}

    def group_scores(self, weight: Tensor, grouping: Grouping, ctx: ScoreContext) -> Tensor:
        """Scores shaped ``grouping.group_shape`` for the canonical ``weight`` chunk."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class PreparedCriterion(Criterion):
    """A criterion whose group scores are all computed in :meth:`prepare` (``ctx.stats``)."""

    requires_data = True

    def group_scores(self, weight: Tensor, grouping: Grouping, ctx: ScoreContext) -> Tensor:
        assert ctx.stats is not None
        return ctx.stats.to(weight.device)


class ElementwiseCriterion(Criterion):
    """A score per weight, summed over each group (so magnitude on a group is its L1 norm)."""

    def elementwise(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def group_scores(self, weight: Tensor, grouping: Grouping, ctx: ScoreContext) -> Tensor:
        scores = self.elementwise(weight)
        if scores.shape != weight.shape:
            raise PruningError(
                f"criterion {self!r} returned scores of shape {tuple(scores.shape)} for layer "
                f"{ctx.layer.name!r}, whose weight chunk is {tuple(weight.shape)}; Fix: return "
                "one score per weight (same shape)."
            )
        if grouping.group_size == 1:
            return scores.reshape(grouping.group_shape)
        return grouping.groups(scores).sum(-1)


class FunctionCriterion(ElementwiseCriterion):
    """Wraps a user function ``f(weight) -> scores`` (same shape, higher = keep)."""

    name = "custom"

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def elementwise(self, weight: Tensor) -> Tensor:
        return self.fn(weight)

    def __repr__(self) -> str:
        return getattr(self.fn, "__name__", "custom")
