"""Random scores: the baseline every comparison must include.

Uniform scores in [0, 1) per *group*, drawn from the generator the engine seeds with the
call's ``seed`` and the layer's name: the same call gives the same mask, and layers draw
independently.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.criteria.base import Criterion, ScoreContext
from prunekit.granularity import Grouping


class Random(Criterion):
    name = "random"

    def group_scores(self, weight: Tensor, grouping: Grouping, ctx: ScoreContext) -> Tensor:
        scores = torch.rand(grouping.group_shape, generator=ctx.generator)
        return scores.to(weight.device)
