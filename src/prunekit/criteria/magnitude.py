"""Weight-size criteria (chapter 3.4.1).

- ``magnitude``: ``|w|``; on a group the sum ``sum |w|`` (Han et al. 2015).
- ``l1``: the group's L1 norm ``sum_{i in S} |w_i|`` (same ranking as magnitude; named
  for the chapter's row-pruning formula).
- ``l2``: the group's L2 norm ``sqrt(sum_{i in S} w_i^2)`` (Li et al. 2017 use it for
  filters). On single weights it equals ``|w|``: as corrections.md notes, L1 and L2 only
  differ as *group* norms.
"""

from __future__ import annotations

from torch import Tensor

from prunekit.criteria.base import Criterion, ElementwiseCriterion, ScoreContext
from prunekit.granularity import Grouping


class Magnitude(ElementwiseCriterion):
    name = "magnitude"

    def elementwise(self, weight: Tensor) -> Tensor:
        return weight.abs()


class L1(Magnitude):
    name = "l1"


class L2(Criterion):
    name = "l2"

    def group_scores(self, weight: Tensor, grouping: Grouping, ctx: ScoreContext) -> Tensor:
        if grouping.group_size == 1:
            return weight.abs().reshape(grouping.group_shape)
        return grouping.groups(weight).norm(dim=-1)
