"""The units of :func:`prunekit.shrink`: the channel groups of each family of the graph.

A channel group is the union of slices of several coupled parameters (a conv's filter,
its bias, its BatchNorm scale and shift, the consumer's input channels...), so
``ChannelUnits.sum(f)`` adds ``f`` over every member parameter position of each group
(each position's slice in float32 or wider, positions in float64: a family can hold
millions of them). Buffers (BatchNorm running statistics) are not scored. With this
view every registered criterion that declares the ``"channels"`` unit kind
(:mod:`prunekit.criteria`) scores families unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from prunekit.criteria.units import Contribution, Units
from prunekit.structured.graph import DependencyGraph, Family, owner


def _batchnorms(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _per_position(values: Tensor, dim: int) -> Tensor:
    """``values`` summed over every dimension but ``dim`` (no copy of ``values``), as
    float64: one position's slice is summed in float32 (or ``values``' wider dtype).

    The dimensions before ``dim`` are summed first, then those after: summing leading
    dimensions adds whole contiguous rows, while one reduction over ``(0, 2, 3)`` of a
    conv weight strides through it (ResNet-50's input-channel sums: 8.7 -> 3.7 ms)."""
    if values.dim() <= 1:
        return values.double()
    acc = torch.promote_types(values.dtype, torch.float32)
    if dim % values.dim():
        values = values.sum(tuple(range(dim % values.dim())), dtype=acc)
    after = tuple(range(1, values.dim()))  # ``dim`` is now the first
    return (values.sum(after, dtype=acc) if after else values).double()


class PositionSums:
    """Per-position sums of ``fn(w, g)`` shared by the families of one unit set: a tensor
    of several families (a conv's outputs in one, its inputs in another) is passed
    through ``fn`` once, then reduced along every dimension ``dims[name]`` the graph uses.
    Only a plain function (no closure, no defaults: same code, same result) is shared."""

    def __init__(self, dims: dict[str, set[int]]) -> None:
        self.dims = dims
        self._done: dict[tuple[object, str], dict[int, Tensor]] = {}

    def get(self, fn: Contribution, name: str, dim: int, values: Callable[[], Tensor]) -> Tensor:
        plain = getattr(fn, "__closure__", True) is None and not getattr(fn, "__defaults__", 1)
        if not plain:
            return _per_position(values(), dim)
        key = (fn.__code__, name)  # type: ignore[attr-defined]
        if key not in self._done:
            computed = values()
            self._done[key] = {d: _per_position(computed, d) for d in self.dims[name] | {dim}}
        return self._done[key][dim]


class ChannelUnits(Units):
    """The groups of one ``family``; ``params`` / ``grads`` map tensor names to tensors."""

    def __init__(
        self,
        family: Family,
        params: dict[str, Tensor],
        grads: dict[str, Tensor] | None = None,
        batchnorms: frozenset[str] = frozenset(),
        sums: PositionSums | None = None,
    ) -> None:
        self.family, self.params, self.grads = family, params, grads
        self._sums = sums or PositionSums({})
        self.shape = (len(family),)
        self.size = None
        self._kinds = {
            r.name: "batchnorm" if owner(r.name) in batchnorms and r.name.endswith(".weight")
            else "param"
            for r in family.runs
            if r.name in params
        }  # fmt: skip

    def has(self, kind: str) -> bool:
        return kind in self._kinds.values()

    def sum(self, fn: Contribution, kind: str | None = None) -> Tensor:
        total = torch.zeros(len(self.family), dtype=torch.float64)
        for runs in self.family.runs:
            if runs.name not in self._kinds or kind not in (None, self._kinds[runs.name]):
                continue
            w = self.params[runs.name].detach()
            g = None if self.grads is None else self.grads.get(runs.name)
            grad = None if g is None else g.detach()
            sums = self._sums.get(fn, runs.name, runs.dim, lambda w=w, g=grad: fn(w, g))
            total.index_add_(0, runs.group, sums[runs.positions])
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
        self._dims: dict[str, set[int]] = {}
        for r in (r for f in graph.families for r in f.runs):
            self._dims.setdefault(r.name, set()).add(r.dim)
        self.names = sorted(n for n in self._dims if n in self._params)
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
        sums = PositionSums(self._dims)  # these grads: a fresh cache
        return {
            fam.name: ChannelUnits(fam, self._params, grad_map, self._bns, sums)
            for fam in self.graph.families
        }
