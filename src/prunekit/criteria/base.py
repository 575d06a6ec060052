"""The criterion contract: how important each unit is (higher = keep), for every engine.

A criterion scores :class:`~prunekit.criteria.units.Units` (weight groups of a
granularity for masks, channel groups of the dependency graph for shrink, the weights of
an LLM layer's rows) from their weights and, for data-driven criteria, statistics gathered
by one pass over a :class:`~prunekit.inputs.Calibration`. One class serves all three::

    class Cube(pk.criteria.Criterion):
        name = "cube"
        def scores(self, units, ctx):
            return units.sum(lambda w, g: w.abs() ** 3)

    pk.prune(model, 0.5, criterion=Cube())        # masks
    pk.shrink(model, x, ratio=0.5, criterion=Cube())   # channels, physically removed
    pk.llm.prune(lm, calibration, method=Cube())  # per-row, block by block

or, for an element-wise score summed over each unit, just ``criterion=lambda w: w.abs() ** 3``.

Data-driven criteria (``requires_data = True``) collect per-unit statistics in
:meth:`Criterion.prepare` (the engine slices them per chunk into ``ctx.stats``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prunekit.criteria.units import GroupUnits, Units, UnitSet
from prunekit.errors import PruningError
from prunekit.granularity import Grouping
from prunekit.inputs import Calibration, LossFn
from prunekit.layers import Layer

Batches = Iterable[Any]
__all__ = [
    "Batches",
    "Criterion",
    "ElementwiseCriterion",
    "FunctionCriterion",
    "LossFn",
    "PreparedCriterion",
    "ScoreContext",
]

UNIT_KINDS = frozenset({"groups", "channels", "rows"})
"""``groups``: masks (:func:`prunekit.prune`); ``channels``: :func:`prunekit.shrink`;
``rows``: :func:`prunekit.llm.prune`."""


@dataclass
class ScoreContext:
    """What a criterion may need besides the units.

    ``name`` is the layer (or channel family) scored, ``stats`` the criterion's own
    statistic for exactly these units (from :meth:`Criterion.prepare`, or the engine's:
    the input column norms of an LLM layer), ``generator`` a seeded RNG private to them.
    """

    name: str
    stats: Tensor | None
    generator: torch.Generator


class Criterion:
    """Base class of all criteria. Subclasses implement :meth:`scores`.

    Class attributes: ``name`` (the registry key); ``requires_data`` (needs calibration
    batches); ``units`` (the unit kinds it can score, see :data:`UNIT_KINDS`);
    ``per_group_stats`` (its prepared statistics hold one value per unit, so chunked
    engines slice them; False for per-layer statistics such as input norms).
    """

    name: ClassVar[str] = "criterion"
    requires_data: ClassVar[bool] = False
    units: ClassVar[frozenset[str]] = UNIT_KINDS
    per_group_stats: ClassVar[bool] = True
    comparable: ClassVar[bool] = False  # scores comparable across layers/families as they are

    def incompatibility(self, layer: Layer) -> str | None:
        """Why this criterion cannot score ``layer`` (checked before anything runs)."""
        return None

    def prepare(
        self, model: nn.Module, units: UnitSet, data: Calibration | None
    ) -> dict[str, Tensor]:
        """Collect statistics per unit set entry (the statistics pass). Default: none."""
        return {}

    def scores(self, units: Units, ctx: ScoreContext) -> Tensor:
        """One score per unit, shaped ``units.shape`` (higher = keep); None from a
        channel criterion means "cannot rank this family" (it is left whole)."""
        raise NotImplementedError

    def group_scores(self, weight: Tensor, grouping: Grouping, ctx: ScoreContext) -> Tensor:
        """:meth:`scores` of the groups of a canonical weight chunk (the masks engine)."""
        return self.scores(GroupUnits(weight, grouping), ctx)

    def __repr__(self) -> str:
        return self.name


class PreparedCriterion(Criterion):
    """A criterion whose scores are all computed in :meth:`prepare` (``ctx.stats``)."""

    requires_data = True

    def scores(self, units: Units, ctx: ScoreContext) -> Tensor:
        assert ctx.stats is not None
        return ctx.stats


class ElementwiseCriterion(Criterion):
    """A score per weight, summed over each unit (so magnitude on a group is its L1 norm)."""

    def elementwise(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def scores(self, units: Units, ctx: ScoreContext) -> Tensor:
        try:
            return units.sum(lambda w, g: self.elementwise(w))
        except ValueError as err:
            raise PruningError(
                f"criterion {self!r} on {ctx.name!r}: {err}; Fix: return one score per weight "
                "(same shape)."
            ) from err


class FunctionCriterion(ElementwiseCriterion):
    """Wraps a user function ``f(weight) -> scores`` (same shape, higher = keep)."""

    name = "custom"

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def elementwise(self, weight: Tensor) -> Tensor:
        return self.fn(weight)

    def __repr__(self) -> str:
        return getattr(self.fn, "__name__", "custom")
