"""Random scores: the baseline every comparison must include.

Uniform scores in [0, 1) per *unit*, drawn from the generator the engine seeds with the
call's ``seed`` and the layer's (or family's) name: the same call gives the same mask,
and layers draw independently.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.criteria.base import Criterion, ScoreContext
from prunekit.criteria.units import Units


class Random(Criterion):
    name = "random"

    def scores(self, units: Units, ctx: ScoreContext) -> Tensor:
        return torch.rand(units.shape, generator=ctx.generator).to(units.device)
