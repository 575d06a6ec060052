"""The units of :func:`prunekit.shrink`: the channel groups of each family of the graph.

A channel group is the union of slices of several coupled parameters (a conv's filter,
its bias, its BatchNorm scale and shift, the consumer's input channels...), so
``ChannelUnits.sum(f)`` adds ``f`` over every member parameter position of each group,
in float64 (a family can hold millions of positions). Buffers (BatchNorm running
statistics) are not scored. With this view every registered criterion that declares the
``"channels"`` unit kind (:mod:`prunekit.criteria`) scores families unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from prunekit.criteria.units import Contribution, Units
from prunekit.structured.graph import DependencyGraph, Family, owner


def _batchnorms(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class ChannelUnits(Units):
    """The groups of one ``family``; ``params`` / ``grads`` map tensor names to tensors."""

    def __init__(
        self,
        family: Family,
        params: dict[str, Tensor],
        grads: dict[str, Tensor] | None = None,
        batchnorms: frozenset[str] = frozenset(),
    ) -> None:
        self.family, self.params, self.grads = family, params, grads
        self.shape = (len(family.groups),)
        self.size = None
        self._kinds = {
            m.name: "batchnorm" if owner(m.name) in batchnorms and m.name.endswith(".weight")
            else "param"
            for m in family.groups[0].members
            if m.name in params
        }  # fmt: skip

    def has(self, kind: str) -> bool:
        return kind in self._kinds.values()

    def sum(self, fn: Contribution, kind: str | None = None) -> Tensor:
        total = torch.zeros(len(self.family.groups), dtype=torch.float64)
        for k, member in enumerate(self.family.groups[0].members):
            if member.name not in self._kinds or kind not in (None, self._kinds[member.name]):
                continue
            w = self.params[member.name].detach()
            g = None if self.grads is None else self.grads.get(member.name)
            values = fn(w, None if g is None else g.detach())
            per_position = values.movedim(member.dim, 0).reshape(w.shape[member.dim], -1)
            per_position = per_position.sum(1, dtype=torch.float64)
            total += torch.stack([per_position[g_.members[k].index].sum()
                                  for g_ in self.family.groups])  # fmt: skip
        return total.float()

    def vectors(self) -> list[Tensor]:
        parts = [[self.params[m.name].detach().index_select(m.dim, m.index).reshape(-1)
                  for m in group.members if m.name in self.params]
                 for group in self.family.groups]  # fmt: skip
        return [torch.cat(p) if p else torch.zeros(1) for p in parts]


class FamilyUnits:
    """The unit set of :func:`prunekit.shrink`: every family of ``graph``."""

    def __init__(self, model: nn.Module, graph: DependencyGraph) -> None:
        self.model, self.graph = model, graph
        self._params = dict(model.named_parameters(remove_duplicate=False))
        members = {m.name for g in graph.groups() for m in g.members}
        self.names = sorted(n for n in members if n in self._params)
        self._bns = frozenset(_batchnorms(model))

    def params(self) -> list[Tensor]:
        return [self._params[n] for n in self.names]

    def units(self, grads: Sequence[Tensor | None] | None = None) -> dict[str, Units]:
        grad_map = None
        if grads is not None:
            grad_map = {
                n: torch.zeros_like(self._params[n]) if g is None else g
                for n, g in zip(self.names, grads, strict=True)
            }
        return {
            fam.name: ChannelUnits(fam, self._params, grad_map, self._bns)
            for fam in self.graph.families
        }
