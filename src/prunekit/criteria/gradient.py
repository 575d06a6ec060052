"""Gradient criteria (chapter 3.4.2), accumulated over every calibration batch given.

- ``gradient``: the chapter's ``|g|``, with ``g = dL/dw`` on each batch, summed over each
  unit and averaged over batches. It ignores the weight itself: a large gradient on a
  tiny weight still ranks high (see corrections.md); prefer ``taylor``.
- ``taylor`` (Molchanov et al. 2017/2019): the first-order estimate of the loss change
  when a unit is removed. For single weights ``|w * g|``; for a unit S (a group of
  weights, or a channel group across coupled layers) the squared sum
  ``(sum_{i in S} w_i g_i)^2``; both averaged over batches.

Gradients are taken with ``torch.autograd.grad`` in eval mode, so neither ``.grad`` nor
BatchNorm running statistics of the model change. The same pass serves masks
(:func:`prunekit.prune`) and channels (:func:`prunekit.shrink`): only the units differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from prunekit.criteria.base import PreparedCriterion
from prunekit.criteria.units import Units, UnitSet
from prunekit.errors import MissingDataError
from prunekit.inputs import Batch, Calibration, call, eval_mode


class GradientStatistic(PreparedCriterion):
    """A per-unit statistic of (weight, gradient), averaged over calibration batches."""

    units = frozenset({"groups", "channels"})  # the LLM engine gathers no gradients

    def batch_statistic(self, units: Units) -> Tensor:
        """The statistic of one batch, from ``units`` carrying that batch's gradients."""
        raise NotImplementedError

    def gradients(
        self, model: nn.Module, batch: Batch, data: Calibration, params: list[Tensor]
    ) -> Sequence[Tensor | None]:
        """``dL/dw`` for every weight in ``params`` (subclasses may return another vector)."""
        loss = data.loss(call(model, batch.inputs), batch)
        return torch.autograd.grad(loss, params, allow_unused=True)

    def prepare(
        self, model: nn.Module, units: UnitSet, data: Calibration | None
    ) -> dict[str, Tensor]:
        if data is None:
            raise MissingDataError(
                f"criterion {self.name!r} needs calibration batches; Fix: pass data=[(x, y), ...] "
                "(a few training batches) and, unless it is cross-entropy, loss_fn."
            )
        params = units.params()
        totals: dict[str, Tensor] = {}
        batches = 0
        with eval_mode(model):
            for batch in data:
                grads = self.gradients(model, batch, data, params)
                for name, unit in units.units(grads).items():
                    stat = self.batch_statistic(unit).detach().cpu()
                    totals[name] = totals[name] + stat if name in totals else stat
                batches += 1
        if batches == 0:
            raise MissingDataError(f"criterion {self.name!r} got an empty data iterable")
        return {name: total / batches for name, total in totals.items()}


class Gradient(GradientStatistic):
    name = "gradient"

    def batch_statistic(self, units: Units) -> Tensor:
        return units.sum(lambda w, g: g.abs())


class Taylor(GradientStatistic):
    name = "taylor"

    def batch_statistic(self, units: Units) -> Tensor:
        contribution = units.sum(lambda w, g: w * g)
        return contribution.abs() if units.size == 1 else contribution.square()
