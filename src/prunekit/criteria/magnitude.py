"""Weight-size criteria (chapter 3.4.1), on any units (groups, channels, rows).

- ``magnitude``: ``|w|``; on a unit the sum ``sum |w|`` (Han et al. 2015).
- ``l1``: the unit's L1 norm ``sum_{i in S} |w_i|`` (same ranking as magnitude; named
  for the chapter's row-pruning formula and Li et al. 2017's filter norm).
- ``l2``: the unit's L2 norm ``sqrt(sum_{i in S} w_i^2)`` (Li et al. 2017 use it for
  filters). On single weights it equals ``|w|``: as corrections.md notes, L1 and L2 only
  differ as *group* norms.
"""

from __future__ import annotations

from torch import Tensor

from prunekit.criteria.base import Criterion, ElementwiseCriterion, ScoreContext
from prunekit.criteria.units import Units


class Magnitude(ElementwiseCriterion):
    name = "magnitude"

    def elementwise(self, weight: Tensor) -> Tensor:
        return weight.abs()


class L1(Magnitude):
    name = "l1"


class L2(Criterion):
    name = "l2"

    def scores(self, units: Units, ctx: ScoreContext) -> Tensor:
        if units.size == 1:
            return units.sum(lambda w, g: w.abs())
        return units.sum(lambda w, g: w.square()).sqrt()
