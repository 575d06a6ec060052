"""Channel-group importance for :func:`prunekit.shrink`, through the one criterion registry.

A family's units are its channel groups (:class:`~prunekit.structured.units.ChannelUnits`):
each is every member parameter slice of one coupling class (buffers such as BatchNorm
running statistics are not scored). Any registered criterion whose ``units`` include
``"channels"`` scores them with the same code it uses for masks:

==========  ==============================================================================
l1          ``sum |w_S|`` (Li et al. 2017, filter L1 norm, over all coupled tensors)
l2          ``sqrt(sum w_S^2)``
taylor      ``mean over batches of (sum w_S * g_S)^2``: the first-order change of the loss
            when the group is removed (Molchanov et al. 2019); needs ``data``
bn_scale    ``sum |gamma_S|`` of the BatchNorm scales in the group (Liu et al. 2017,
            network slimming); families without BatchNorm are not pruned
fpgm        ``sum_j ||v_S - v_j||_2`` over the family's groups ``j`` (He et al. 2019)
lamp        ``||w_S||^2 / sum_{j: ||w_j|| >= ||w_S||} ||w_j||^2`` within the family
            (Lee et al. 2021); comparable across families without normalisation
random      uniform, seeded per family
==========  ==============================================================================

A custom criterion is a :class:`~prunekit.criteria.Criterion` or, as for masks, a
function ``f(weight) -> scores`` of the same shape, summed over each group's positions.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from prunekit import criteria
from prunekit.criteria import Criterion, ScoreContext
from prunekit.errors import MissingDataError
from prunekit.inputs import Calibration, LossFn
from prunekit.structured.graph import DependencyGraph
from prunekit.structured.units import FamilyUnits

StructuredCriterion = str | Criterion | Callable[[Tensor], Tensor]


def resolve(criterion: StructuredCriterion) -> Criterion:
    """The registered criterion for channel groups (:class:`UnknownChoiceError` if the
    criterion cannot score them)."""
    return criteria.get(criterion, units="channels")


def score(
    model: nn.Module,
    graph: DependencyGraph,
    criterion: StructuredCriterion = "l2",
    *,
    data: Iterable[Any] | Calibration | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
) -> dict[str, Tensor | None]:
    """Scores per family (``None``: the criterion cannot rank it, e.g. no BatchNorm).

    The random criterion draws from a generator seeded with ``seed + crc32(family)``.
    """
    crit = resolve(criterion)
    units = FamilyUnits(model, graph)
    stats: dict[str, Tensor] = {}
    if crit.requires_data:
        if data is None:
            raise MissingDataError(
                f"criterion {crit.name!r} needs batches; Fix: pass data=[(inputs, targets), "
                "...] and, unless it is cross-entropy, loss_fn."
            )
        prepare = criteria.guard(crit, crit.prepare, "collecting its statistics")
        stats = prepare(model, units, Calibration(data, loss_fn=loss_fn))
    out: dict[str, Tensor | None] = {}
    for name, unit in units.units().items():
        gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        scores = criteria.guard(crit, crit.scores, f"scoring channel family {name!r}")
        result = scores(unit, ScoreContext(name, stats.get(name), gen))
        out[name] = None if result is None else torch.as_tensor(result).float()
    return out
