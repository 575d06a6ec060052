"""Channel labels: which removable channel every element of a tensor belongs to.

Tracing gives every parameter dimension that can shrink a run of fresh *atoms* (one per
index), and every activation a :class:`Label`: the dimension along which its channels
vary and, for each index of that dimension, the atom it carries. Operations that couple
channels (a residual addition, a consumer reading a producer, a BatchNorm) *unite* atoms
in a union-find; in the end each union class is one group of coupled channels that can
only be removed together. ``FIXED`` marks positions that can never be removed (model
inputs, constants); uniting an atom with ``FIXED`` *blocks* its class.

An activation's channels vary along at most one dimension. When an operation produces
labels that vary along several (``(B, T, C) -> (B, T, heads, head_dim)``), the atoms
along the inner dimensions are united, so a whole head becomes one group and the tensor
stays rectangular after removal (see :meth:`Atoms.normalize`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prunekit.errors import CouplingError

FIXED = -1


@dataclass(frozen=True)
class Label:
    """Atoms along one dimension: ``ids[i]`` is the atom of index ``i`` of dimension ``dim``."""

    dim: int
    ids: Tensor

    def full(self, shape: torch.Size) -> Tensor:
        """The label of every element, as an int64 tensor of ``shape``."""
        view = [1] * len(shape)
        view[self.dim] = shape[self.dim]
        return self.ids.view(view).expand(shape).contiguous()


class Atoms:
    """Union-find over atoms, with blocked (never removable) classes."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.blocked: set[int] = set()

    def new(self, n: int) -> Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        if a == FIXED or b == FIXED:
            self.block([a, b])
            return
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def unite(self, a: Tensor, b: Tensor) -> None:
        """Unite ``a[i]`` with ``b[i]`` for every ``i`` (a ``FIXED`` side blocks the other)."""
        if a.numel() != b.numel():
            raise CouplingError(f"cannot couple {a.numel()} channels with {b.numel()} channels")
        for x, y in set(zip(a.tolist(), b.tolist(), strict=True)):
            if x != y:
                self.union(x, y)

    def unite_all(self, ids: Tensor) -> None:
        """Unite every atom in ``ids`` into one class (blocked if any is ``FIXED``)."""
        atoms = ids.unique().tolist()
        for a in atoms[1:]:
            self.union(atoms[0], a)
        if atoms and atoms[0] == FIXED:
            self.block(atoms)

    def block(self, ids: Tensor | list[int]) -> None:
        values = ids.unique().tolist() if isinstance(ids, Tensor) else ids
        self.blocked.update(v for v in values if v != FIXED)

    def blocked_roots(self) -> set[int]:
        return {self.find(b) for b in self.blocked}

    def all_roots(self) -> Tensor:
        """The root of every atom, vectorised (pointer jumping: ``p = p[p]`` until stable)."""
        parent = torch.tensor(self.parent, dtype=torch.long)
        while True:
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                return parent
            parent = jumped

    def normalize(self, full: Tensor) -> Label | None:
        """Turn per-element labels into a :class:`Label` varying along one dimension.

        The outermost varying dimension keeps its atoms; atoms along any other varying
        dimension are united per index of the kept one. Labels that do not vary at all
        (one channel everywhere) are blocked: removing it would remove the whole tensor.
        """
        if full.numel() == 0 or bool((full == FIXED).all()):
            return None
        varying = [
            d
            for d in range(full.dim())
            if full.shape[d] > 1 and not bool((full == full.narrow(d, 0, 1)).all())
        ]
        if not varying:
            self.block(full)
            return None
        dim = varying[0]
        rows = full.movedim(dim, 0).reshape(full.shape[dim], -1)
        if len(varying) > 1:
            for row in rows:
                self.unite_all(row)
        return Label(dim, rows[:, 0].clone())
