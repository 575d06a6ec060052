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

import numpy as np
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
    """Union-find over atoms, with blocked (never removable) classes, vectorised.

    Unions are recorded as arrays of edges and resolved together when a root is first
    asked for (``find``, ``all_roots``): every class is then labelled by its smallest
    atom, found by *hooking and pointer jumping* (Shiloach & Vishkin 1982): each round
    hooks every root to the smallest root it shares an edge with
    (``p[max(ru, rv)] = min(ru, rv)``, the minimum over duplicates), then jumps pointers
    (``p = p[p]``) until every atom points at its root; rounds repeat until every edge
    joins equal roots. A trace unites O(channels) pairs in a few numpy passes instead of
    one Python call per channel.
    """

    def __init__(self) -> None:
        self.size = 0
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self._blocked: list[np.ndarray] = []
        self._roots = np.zeros(0, dtype=np.int64)

    def new(self, n: int) -> Tensor:
        start, self.size = self.size, self.size + n
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, a: int) -> int:
        return int(self._resolved()[a])

    def unite(self, a: Tensor, b: Tensor) -> None:
        """Unite ``a[i]`` with ``b[i]`` for every ``i`` (a ``FIXED`` side blocks the other)."""
        if a.numel() != b.numel():
            raise CouplingError(f"cannot couple {a.numel()} channels with {b.numel()} channels")
        x, y = _array(a), _array(b)
        fixed = (x == FIXED) | (y == FIXED)
        if fixed.any():
            self._block(np.concatenate([x[fixed], y[fixed]]))
            x, y = x[~fixed], y[~fixed]
        differ = x != y
        if differ.any():
            self._edges.append((x[differ], y[differ]))

    def unite_all(self, ids: Tensor) -> None:
        """Unite every atom in ``ids`` into one class (blocked if any is ``FIXED``)."""
        self.unite_rows(ids.reshape(1, -1))

    def unite_rows(self, rows: Tensor) -> None:
        """``unite_all`` on every row of the 2-D ``rows`` at once."""
        if rows.numel() == 0:
            return
        values = rows.detach().numpy().astype(np.int64, copy=False)
        pivot = values.min(axis=1, keepdims=True)
        fixed = (pivot == FIXED).reshape(-1)
        self._block(values[fixed].reshape(-1))
        kept = values[~fixed]
        pivots = np.repeat(pivot[~fixed], kept.shape[1], axis=1)  # a writable array
        self.unite(torch.from_numpy(pivots.reshape(-1)),
                   torch.from_numpy(kept.reshape(-1)))  # fmt: skip

    def block(self, ids: Tensor | list[int]) -> None:
        self._block(_array(ids) if isinstance(ids, Tensor) else np.asarray(ids, dtype=np.int64))

    def _block(self, values: np.ndarray) -> None:
        values = values.reshape(-1)
        self._blocked.append(values[values != FIXED])

    def blocked_roots(self) -> set[int]:
        return set(np.flatnonzero(self.blocked_root_mask()).tolist())

    def blocked_root_mask(self) -> np.ndarray:
        """``mask[r]``: whether ``r`` is the root of a blocked class (one bool per atom)."""
        roots = self._resolved()
        mask = np.zeros(self.size, dtype=bool)
        if self._blocked:
            mask[roots[np.concatenate(self._blocked)]] = True
        return mask

    def all_roots(self) -> Tensor:
        """The root (smallest atom of its class) of every atom."""
        return torch.from_numpy(self._resolved().copy())

    def _resolved(self) -> np.ndarray:
        if not self._edges and len(self._roots) == self.size:
            return self._roots
        parent = np.concatenate([self._roots, np.arange(len(self._roots), self.size)])
        if self._edges:
            u = np.concatenate([e[0] for e in self._edges])
            v = np.concatenate([e[1] for e in self._edges])
            self._edges = []
            while True:
                ru, rv = parent[u], parent[v]
                differ = ru != rv
                if not differ.any():
                    break
                ru, rv = ru[differ], rv[differ]
                np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
                parent = _jump(parent)
                u, v = u[differ], v[differ]
        self._roots = parent
        return parent

    def normalize(self, full: Tensor) -> Label | None:
        """Turn per-element labels into a :class:`Label` varying along one dimension.

        The outermost varying dimension keeps its atoms; atoms along any other varying
        dimension are united per index of the kept one. Dimensions the labels do not vary
        along are narrowed to one index first, so uniting costs the distinct labels, not
        every element (a token dimension repeats the same atoms). Labels that do not vary
        at all (one channel everywhere) are blocked: removing it would remove the whole
        tensor.
        """
        if full.numel() == 0:
            return None
        core, varying = full, []
        for d in range(full.dim()):  # constant along d: index 0 of d says it all
            if core.shape[d] > 1 and bool((core != core.narrow(d, 0, 1)).any()):
                varying.append(d)
            else:
                core = core.narrow(d, 0, 1)
        if bool((core == FIXED).all()):
            return None
        if not varying:
            self.block(core)
            return None
        dim = varying[0]
        rows = core.movedim(dim, 0).reshape(core.shape[dim], -1)
        if len(varying) > 1:
            self.unite_rows(rows)
        return Label(dim, rows[:, 0].clone())


def _array(ids: Tensor) -> np.ndarray:
    return ids.detach().reshape(-1).numpy().astype(np.int64, copy=False)


def _jump(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping: ``p = p[p]`` until every atom points at its root."""
    while True:
        jumped = parent[parent]
        if np.array_equal(jumped, parent):
            return parent
        parent = jumped
