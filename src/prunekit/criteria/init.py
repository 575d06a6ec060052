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
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from prunekit.criteria.base import PreparedCriterion
from prunekit.criteria.gradient import GradientStatistic
from prunekit.criteria.units import LayerUnits, Units, UnitSet
from prunekit.errors import MissingDataError
from prunekit.inputs import Batch, Calibration, Inputs, call
from prunekit.layers import weight_param


class SNIP(GradientStatistic):
    """``|w * dL/dw|`` summed per unit, averaged over batches (Lee et al. 2019)."""

    name = "snip"

    def batch_statistic(self, units: Units) -> Tensor:
        return units.sum(lambda w, g: (w * g).abs())


class GraSP(GradientStatistic):
    """``w * (H g)`` summed per unit, averaged over batches (Wang et al. 2020)."""

    name = "grasp"
    temperature: ClassVar[float] = 200.0

    def gradients(
        self, model: nn.Module, batch: Batch, data: Calibration, params: list[Tensor]
    ) -> Sequence[Tensor | None]:
        loss = data.loss(call(model, batch.inputs), batch, scale=self.temperature)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        z = sum((g * g.detach()).sum() for g in grads if g is not None)
        return torch.autograd.grad(z, params, allow_unused=True)

    def batch_statistic(self, units: Units) -> Tensor:
        return units.sum(lambda w, g: w * g)


def _first_inputs(data: Calibration | None, name: str) -> Inputs:
    batch = next(iter(data), None) if data is not None else None
    if batch is None:
        raise MissingDataError(
            f"criterion {name!r} needs the input shape; Fix: pass data=[example_inputs]."
        )
    return batch.inputs


class SynFlow(PreparedCriterion):
    """``|w * dR/dw|`` with ``R = sum(f_|theta|(1))`` in float64 (Tanaka et al. 2020)."""

    name = "synflow"
    units = frozenset({"groups"})

    def prepare(
        self, model: nn.Module, units: UnitSet, data: Calibration | None
    ) -> dict[str, Tensor]:
        assert isinstance(units, LayerUnits), "SynFlow scores the layers of pk.prune"
        inputs = _first_inputs(data, self.name)
        # A float64 copy with |theta|: the flow is measured on it, the model is untouched.
        probe = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            for p in probe.parameters():
                p.abs_()
        ones = torch.ones(inputs.shape, dtype=torch.float64, device=inputs.device)
        params = [weight_param(probe.get_submodule(layer.name)) for layer in units.layers]
        flow = probe(ones).sum()
        grads = torch.autograd.grad(flow, params, allow_unused=True)
        scores = [(w.detach() * (torch.zeros_like(w) if g is None else g)).abs()
                  for w, g in zip(params, grads, strict=True)]  # fmt: skip
        # float64 scores: flows span many decades
        flows = LayerUnits(probe, units.layers, units.groupings).units(scores)
        return {name: u.sum(lambda w, g: g).cpu() for name, u in flows.items()}
