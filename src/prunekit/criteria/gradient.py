"""Gradient criteria (chapter 3.4.2), accumulated over every batch given.

- ``gradient``: the chapter's ``|g|``, with ``g = dL/dw`` on each batch, summed over each
  group and averaged over batches. It ignores the weight itself: a large gradient on a
  tiny weight still ranks high (see corrections.md); prefer ``taylor``.
- ``taylor`` (Molchanov et al. 2017/2019): the first-order estimate of the loss change
  when a weight is removed. For single weights ``|w * g|``; for a group S the squared
  sum ``(sum_{i in S} w_i g_i)^2``; both averaged over batches.

Gradients are taken with ``torch.autograd.grad`` in eval mode, so neither ``.grad`` nor
BatchNorm running statistics of the model change.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.criteria.base import Batches, LossFn, PreparedCriterion
from prunekit.errors import MissingDataError
from prunekit.granularity import Grouping
from prunekit.inputs import eval_mode
from prunekit.layers import Layer, to_canonical


class GradientStatistic(PreparedCriterion):
    """A per-group statistic of (weight, gradient), averaged over calibration batches."""

    def batch_statistic(self, weight: Tensor, grad: Tensor, grouping: Grouping) -> Tensor:
        raise NotImplementedError

    def gradients(
        self, outputs: Tensor, targets: Any, loss_fn: LossFn, params: list[Tensor]
    ) -> tuple[Tensor | None, ...]:
        """``dL/dw`` for every weight in ``params`` (subclasses may return another vector)."""
        return torch.autograd.grad(loss_fn(outputs, targets), params, allow_unused=True)

    def prepare(
        self,
        model: nn.Module,
        layers: list[Layer],
        groupings: dict[str, Grouping],
        data: Batches | None,
        loss_fn: LossFn | None,
    ) -> dict[str, Tensor]:
        if data is None:
            raise MissingDataError(
                f"criterion {self.name!r} needs calibration batches; Fix: pass data=[(x, y), ...] "
                "(a few training batches) and, unless it is cross-entropy, loss_fn."
            )
        loss_fn = loss_fn or F.cross_entropy
        params = [layer.weight for layer in layers]
        totals = {ly.name: torch.zeros(groupings[ly.name].group_shape) for ly in layers}
        batches = 0
        with eval_mode(model):
            for inputs, targets in data:
                grads = self.gradients(model(inputs), targets, loss_fn, params)
                for layer, weight, grad in zip(layers, params, grads, strict=True):
                    grad = torch.zeros_like(weight) if grad is None else grad
                    stat = self.batch_statistic(
                        to_canonical(layer.module, weight.detach()),
                        to_canonical(layer.module, grad),
                        groupings[layer.name],
                    )
                    totals[layer.name] += stat.cpu()
                batches += 1
        if batches == 0:
            raise MissingDataError(f"criterion {self.name!r} got an empty data iterable")
        return {name: total / batches for name, total in totals.items()}


class Gradient(GradientStatistic):
    name = "gradient"

    def batch_statistic(self, weight: Tensor, grad: Tensor, grouping: Grouping) -> Tensor:
        return grouping.groups(grad.abs()).sum(-1)


class Taylor(GradientStatistic):
    name = "taylor"

    def batch_statistic(self, weight: Tensor, grad: Tensor, grouping: Grouping) -> Tensor:
        contribution = grouping.groups(weight * grad).sum(-1)
        return contribution.abs() if grouping.group_size == 1 else contribution.square()
