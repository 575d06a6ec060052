"""Criteria defined on channel groups of the dependency graph (:func:`prunekit.shrink`).

- ``bn_scale`` (Liu et al. 2017, network slimming): ``sum |gamma_S|``, the BatchNorm
  scales in the group; a family without BatchNorm is not ranked (left whole).
- ``fpgm`` (He et al. 2019): ``sum_j ||v_S - v_j||_2`` over the family's units ``j``:
  units nearest the geometric median are redundant and go first.
- ``lamp`` (Lee et al. 2021): ``||w_S||^2 / sum_{j: ||w_j|| >= ||w_S||} ||w_j||^2``
  within the family; comparable across families without normalisation.

They need the whole family at once, so the chunked masks engine does not take them
(``units = {"channels"}``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prunekit.criteria.base import Criterion, ScoreContext
from prunekit.criteria.units import Units


class BNScale(Criterion):
    name = "bn_scale"
    units = frozenset({"channels"})

    def scores(self, units: Units, ctx: ScoreContext) -> Tensor | None:  # type: ignore[override]
        if not units.has("batchnorm"):
            return None
        return units.sum(lambda w, g: w.abs(), kind="batchnorm")


class FPGM(Criterion):
    name = "fpgm"
    units = frozenset({"channels"})

    def scores(self, units: Units, ctx: ScoreContext) -> Tensor:
        vectors = units.vectors()
        width = max(v.numel() for v in vectors)
        stacked = torch.stack([F.pad(v, (0, width - v.numel())) for v in vectors])
        return torch.cdist(stacked[None], stacked[None])[0].sum(1)


def lamp_scores(l2sq: Tensor) -> Tensor:
    """LAMP of squared norms: each over the sum of the squared norms at least as large."""
    order = torch.argsort(l2sq, descending=True, stable=True)
    suffix = torch.cumsum(l2sq[order], 0)  # sum over units at least as large
    scores = torch.empty_like(l2sq)
    scores[order] = l2sq[order] / suffix.clamp_min(1e-30)
    return scores


class LAMP(Criterion):
    name = "lamp"
    units = frozenset({"channels"})
    comparable = True  # no per-family normalisation needed under global scope

    def scores(self, units: Units, ctx: ScoreContext) -> Tensor:
        return lamp_scores(units.sum(lambda w, g: w.square()))
