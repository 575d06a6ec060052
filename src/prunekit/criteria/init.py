"""Criteria for pruning at initialisation, before any training (chapter 3.6.3).

- ``snip`` (Lee et al. 2019, connection sensitivity): ``|w * dL/dw|`` on a few batches at
  initialisation, summed per group; prune globally, lowest first.
- ``grasp`` (Wang et al. 2020, gradient signal preservation): with ``g = dL/dw`` on
  logits divided by a temperature ``T = 200`` and ``H`` the Hessian,
  ``S(w) = -w * (H g)``; GraSP removes the *largest* ``S``, so the importance kept here is
  ``-S = w * (H g)`` (``H g`` by double back-propagation of ``g . stopgrad(g)``).
- ``synflow`` (Tanaka et al. 2020, iterative synaptic flow): data-free. Every parameter
  is replaced by its absolute value (float64, eval mode), the input by ones of the same
  shape, ``R = sum(model(ones))`` and the score is ``|w * dR/dw|``. It is meant to be
  applied over many rounds with an exponential schedule (``synflow_prune`` in
  :mod:`prunekit.training.at_init`), each round scoring the already-masked network.
  ``data`` only gives the input shape: ``data=[example_inputs]``.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prunekit.criteria.base import Batches, LossFn, PreparedCriterion
from prunekit.criteria.gradient import GradientStatistic
from prunekit.errors import MissingDataError
from prunekit.granularity import Grouping
from prunekit.layers import Layer, to_canonical, weight_param


class SNIP(GradientStatistic):
    """``|w * dL/dw|`` summed per group, averaged over batches (Lee et al. 2019)."""

    name = "snip"

    def batch_statistic(self, weight: Tensor, grad: Tensor, grouping: Grouping) -> Tensor:
        return grouping.groups((weight * grad).abs()).sum(-1)


class GraSP(GradientStatistic):
    """``w * (H g)`` summed per group, averaged over batches (Wang et al. 2020)."""

    name = "grasp"
    temperature: ClassVar[float] = 200.0

    def gradients(
        self, outputs: Tensor, targets: Any, loss_fn: LossFn, params: list[Tensor]
    ) -> tuple[Tensor | None, ...]:
        loss = loss_fn(outputs / self.temperature, targets)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        z = sum((g * g.detach()).sum() for g in grads if g is not None)
        return torch.autograd.grad(z, params, allow_unused=True)

    def batch_statistic(self, weight: Tensor, grad: Tensor, grouping: Grouping) -> Tensor:
        return grouping.groups(weight * grad).sum(-1)


def _first_inputs(data: Batches | None, name: str) -> Any:
    batch = next(iter(data), None) if data is not None else None
    if batch is None:
        raise MissingDataError(
            f"criterion {name!r} needs the input shape; Fix: pass data=[example_inputs]."
        )
    return batch[0] if isinstance(batch, tuple | list) else batch


class SynFlow(PreparedCriterion):
    """``|w * dR/dw|`` with ``R = sum(f_|theta|(1))`` in float64 (Tanaka et al. 2020)."""

    name = "synflow"

    def prepare(
        self,
        model: nn.Module,
        layers: list[Layer],
        groupings: dict[str, Grouping],
        data: Batches | None,
        loss_fn: LossFn | None,
    ) -> dict[str, Tensor]:
        inputs = _first_inputs(data, self.name)
        probe = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            for p in probe.parameters():
                p.abs_()
        ones = torch.ones(inputs.shape, dtype=torch.float64, device=inputs.device)
        params = [weight_param(probe.get_submodule(layer.name)) for layer in layers]
        flow = probe(ones).sum()
        grads = torch.autograd.grad(flow, params, allow_unused=True)
        stats = {}
        for layer, w, g in zip(layers, params, grads, strict=True):
            score = (w.detach() * (torch.zeros_like(w) if g is None else g)).abs()
            canonical = to_canonical(layer.module, score)  # float64: flows span many decades
            stats[layer.name] = groupings[layer.name].groups(canonical).sum(-1).cpu()
        return stats
