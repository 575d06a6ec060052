"""Units: what competes, as a criterion sees it, whatever the engine.

A criterion scores *units*; the engines differ only in what a unit is:

- :class:`GroupUnits` (masks, :func:`prunekit.prune`; rows of an LLM layer in
  :func:`prunekit.llm.prune`): the groups of one canonical weight under a granularity;
- ``ChannelUnits`` (:func:`prunekit.shrink`, in :mod:`prunekit.structured.units`): the
  channel groups of one family of the dependency graph, each the union of slices of
  several coupled parameters.

Both answer the same questions, so a criterion is written once::

    units.sum(lambda w, g: w.abs())          # sum over each unit of f(weight, gradient)
    units.shape                              # the shape of the scores to return
    units.size                               # weights per unit (None when they differ)

A *unit set* (:class:`UnitSet`) is the engine's view of all the units of one call, which
the statistics pass of data-driven criteria walks: the parameters to differentiate, and
their units with the gradients attached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from prunekit.granularity import Grouping
from prunekit.layers import Layer, to_canonical

Contribution = Callable[[Tensor, Tensor | None], Tensor]
"""``f(weight, gradient) -> values``, elementwise (``gradient`` is None without one)."""


class Units:
    """The units of one layer (or family): see the module docstring."""

    shape: tuple[int, ...]
    size: int | None
    device: torch.device = torch.device("cpu")

    def sum(self, fn: Contribution, kind: str | None = None) -> Tensor:
        """``sum_{i in unit} fn(w, g)_i`` per unit, shaped :attr:`shape`. ``kind`` keeps
        only members of that kind (``"batchnorm"``: BatchNorm scales); None: all."""
        raise NotImplementedError

    def has(self, kind: str) -> bool:
        """Whether any member is of ``kind``."""
        return False

    def vectors(self) -> list[Tensor]:
        """Every unit's weights, flattened (one vector per unit)."""
        raise NotImplementedError

    @property
    def count(self) -> int:
        return int(torch.Size(self.shape).numel())


class GroupUnits(Units):
    """The groups of a canonical weight (chunk) under ``grouping``, with an optional
    gradient of the same shape."""

    def __init__(self, weight: Tensor, grouping: Grouping, grad: Tensor | None = None) -> None:
        self.weight, self.grouping, self.grad = weight, grouping, grad
        self.shape = grouping.group_shape
        self.size = grouping.group_size
        self.device = weight.device

    def sum(self, fn: Contribution, kind: str | None = None) -> Tensor:
        values = fn(self.weight, self.grad)
        if kind is not None:
            return torch.zeros(self.shape, device=values.device)
        if values.shape != self.weight.shape:
            raise ValueError(
                f"returned scores of shape {tuple(values.shape)} for a weight of shape "
                f"{tuple(self.weight.shape)}"
            )
        if self.size == 1:
            return values.reshape(self.shape)
        return self.grouping.groups(values).sum(-1)

    def vectors(self) -> list[Tensor]:
        return list(self.grouping.groups(self.weight).reshape(self.count, -1))


class UnitSet(Protocol):
    """All the units of one call: what a statistics pass walks."""

    def params(self) -> list[Tensor]:
        """The parameters whose gradients the units need."""
        ...

    def units(self, grads: Sequence[Tensor | None] | None = None) -> dict[str, Units]:
        """The units by name, with ``grads`` (aligned with :meth:`params`) attached."""
        ...


class LayerUnits:
    """The unit set of :func:`prunekit.prune`: each layer's groups (full-layer grouping)."""

    def __init__(self, model: nn.Module, layers: list[Layer], groupings: dict[str, Grouping]):
        self.model, self.layers, self.groupings = model, layers, groupings

    def params(self) -> list[Tensor]:
        return [layer.weight for layer in self.layers]

    def units(self, grads: Sequence[Tensor | None] | None = None) -> dict[str, Units]:
        out: dict[str, Units] = {}
        for i, layer in enumerate(self.layers):
            weight = layer.weight.detach()
            grad = None if grads is None else grads[i]
            if grads is not None and grad is None:
                grad = torch.zeros_like(weight)
            out[layer.name] = GroupUnits(
                to_canonical(layer.module, weight),
                self.groupings[layer.name],
                None if grad is None else to_canonical(layer.module, grad),
            )
        return out
