"""Granularity: what one prunable unit (a *group* of weights) is.

Every layer's weight is seen in the canonical layout ``(out, in, *kernel)``
(:mod:`prunekit.layers`). A granularity splits that tensor into equal-sized groups;
a criterion scores each group, the scope decides which groups go, and the granularity
expands the group decisions back into a weight mask.

============  =======================================================  =================
name          one group is                                             shrinks densely?
============  =======================================================  =================
element       one weight (fine-grained, Han 2015)                      no
"N:M"         N kept of every M consecutive inputs (reduction axis;    no (sparse cores)
              for a conv: input channels at each kernel position)
"N:M-2d"      an M x M tile (outputs x inputs) keeping N per row AND   no (sparse cores)
              per column, so W and W^T are both N:M (M <= 4)
row           a vector along the last axis: a Linear's output row, a   no
              conv kernel's row (vector level, Mao 2017)
column        a vector along the second-to-last axis: a Linear's       no
              input column, a conv kernel's column
kernel        one k x k kernel ``W[o, i]`` of a conv                   no
filter        one output channel ``W[o]`` (dims 1, 2, 3)               yes (shrink)
channel       one input channel ``W[:, i]`` (dims 0, 2, 3)             yes (shrink)
"block:AxB"   an A x B tile of the GEMM matrix ``(out, in*kernel)``    no (BSR)
============  =======================================================  =================

Shapes that do not divide (N:M where M does not divide ``in``, a block that does not
tile the matrix) are an error, never a padded or silently partial mask: the layer is
reported as incompatible, and skipped only when the user did not name it explicitly.

N:M masks come from either of two equal methods (:func:`nm_mask_patterns`, the
chapter's, and :func:`nm_mask_topn`, faster for large M); both break ties towards the
lower index, so they give identical masks.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from prunekit.errors import UnknownChoiceError
from prunekit.layers import Layer, kernel_ndim


@dataclass(frozen=True)
class Grouping:
    """How a canonical tensor of ``shape`` splits into groups.

    The tensor is reshaped to ``split_shape`` and permuted so that ``group_axes`` come
    first and ``member_axes`` last; the members of one group are then flattened into the
    last dimension: ``groups(t)`` has shape ``(*group_shape, group_size)``.
    """

    shape: tuple[int, ...]
    split_shape: tuple[int, ...]
    group_axes: tuple[int, ...]
    member_axes: tuple[int, ...]

    @property
    def group_shape(self) -> tuple[int, ...]:
        return tuple(self.split_shape[a] for a in self.group_axes)

    @property
    def group_size(self) -> int:
        return math.prod(self.split_shape[a] for a in self.member_axes)

    @property
    def num_groups(self) -> int:
        return math.prod(self.group_shape)

    def groups(self, t: Tensor) -> Tensor:
        """``t`` (canonical ``shape``) as ``(*group_shape, group_size)``."""
        x = t.reshape(self.split_shape).permute(*self.group_axes, *self.member_axes)
        return x.reshape(*self.group_shape, self.group_size)

    def expand(self, keep: Tensor) -> Tensor:
        """A per-group tensor ``(*group_shape)`` broadcast back to the canonical ``shape``."""
        n_member = len(self.member_axes)
        x = keep.reshape(*self.group_shape, *([1] * n_member))
        x = x.expand(*self.group_shape, *(self.split_shape[a] for a in self.member_axes))
        order = self.group_axes + self.member_axes
        inverse = tuple(order.index(a) for a in range(len(order)))
        return x.permute(*inverse).reshape(self.shape)


def _grouping(shape: tuple[int, ...], members: tuple[int, ...]) -> Grouping:
    axes = tuple(a for a in range(len(shape)) if a not in members)
    return Grouping(shape, shape, axes, members)


class Granularity:
    """Base class: a named way of splitting a weight into groups.

    Subclasses define :meth:`grouping` and, where a layer cannot be split,
    :meth:`incompatibility`. ``rows_per_group`` tells the engine it may process a weight
    in chunks of output rows (a multiple of it); ``None`` when groups span all rows.
    """

    name: str = "granularity"
    rows_per_group: int | None = 1
    shrinkable: bool = False

    def incompatibility(self, layer: Layer) -> str | None:
        """Why this granularity cannot apply to ``layer``, or None if it can."""
        return None

    def grouping(self, shape: tuple[int, ...]) -> Grouping:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class Element(Granularity):
    name = "element"

    def grouping(self, shape: tuple[int, ...]) -> Grouping:
        return _grouping(shape, ())


class Row(Granularity):
    name = "row"

    def grouping(self, shape: tuple[int, ...]) -> Grouping:
        return _grouping(shape, (len(shape) - 1,))


class Column(Granularity):
    name = "column"
    rows_per_group = None

    def grouping(self, shape: tuple[int, ...]) -> Grouping:
        return _grouping(shape, (len(shape) - 2,))


class Kernel(Granularity):
    name = "kernel"

    def incompatibility(self, layer: Layer) -> str | None:
        if kernel_ndim(layer.module) == 0:
            return f"{layer.kind} has no kernel; use element, row or column"
        return None

    def grouping(self, shape: tuple[int, ...]) -> Grouping:
        return _grouping(shape, tuple(range(2, len(shape))))


class Filter(Granularity):
    name = "filter"
    shrinkable = True

    def grouping(self, shape: tuple[int, ...]) -> Grouping:
        return _grouping(shape, tuple(range(1, len(shape))))


class Channel(Granularity):
    name = "channel"
    rows_per_group = None
    shrinkable = True

    def grouping(self, shape: tuple[int, ...]) -> Grouping:
        return _grouping(shape, (0, *range(2, len(shape))))


@dataclass(frozen=True, repr=False)
class Block(Granularity):
    """A x B tiles of the GEMM matrix ``(out, in * prod(kernel))``."""

    rows: int
    cols: int

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"block:{self.rows}x{self.cols}"

    @property
    def rows_per_group(self) -> int:  # type: ignore[override]
        return self.rows

    def incompatibility(self, layer: Layer) -> str | None:
        out = layer.canonical.shape[0]
        width = layer.canonical[0].numel()
        if out % self.rows or width % self.cols:
            return (
                f"block {self.rows}x{self.cols} does not tile its {out}x{width} matrix; "
                "use a block size that divides both, or exclude the layer"
            )
        return None

    def grouping(self, shape: tuple[int, ...]) -> Grouping:
        out, width = shape[0], math.prod(shape[1:])
        split = (out // self.rows, self.rows, width // self.cols, self.cols)
        return Grouping(shape, split, (0, 2), (1, 3))


@dataclass(frozen=True, repr=False)
class NM(Granularity):
    """N:M: at most ``n`` nonzeros in every ``m`` consecutive weights of the reduction axis.

    Groups run along the input axis of the canonical ``(out, in, *kernel)`` weight, for
    every output and kernel position: the layout sparse tensor cores accelerate
    (NVIDIA Ampere 2:4). Sparsity is fixed at ``1 - n/m``; no scope or allocation applies.
    ``method`` picks :func:`nm_mask_topn` (default) or :func:`nm_mask_patterns`.
    """

    n: int
    m: int
    method: str = "topn"

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def incompatibility(self, layer: Layer) -> str | None:
        width = layer.canonical.shape[1]
        if width % self.m:
            return (
                f"{self.name} needs the input axis ({width}) to be a multiple of M={self.m}; "
                "exclude the layer or pick an M that divides it"
            )
        return None

    def grouping(self, shape: tuple[int, ...]) -> Grouping:
        # Element scores; the N:M choice is made by `keep` below.
        return _grouping(shape, ())

    def keep(self, scores: Tensor) -> Tensor:
        """Bool keep-mask for canonical ``scores``: the best N of every M inputs."""
        # Already-pruned weights score -inf; clamp so that pattern sums stay finite.
        scores = scores.clamp(min=torch.finfo(scores.dtype).min / self.m)
        moved = scores.movedim(1, -1)  # (out, *kernel, in)
        grouped = moved.reshape(-1, self.m)
        select = nm_mask_patterns if self.method == "patterns" else nm_mask_topn
        keep = select(grouped, self.n, self.m)
        return keep.reshape(moved.shape).movedim(-1, 1)


@dataclass(frozen=True, repr=False)
class NM2D(NM):
    """2-D N:M: every ``m x m`` tile of (outputs x inputs) keeps ``n`` per row and ``n`` per
    column, so the weight is N:M along its inputs and its transpose along its outputs: the
    backward pass (``grad_x = grad_y @ W``) can use sparse cores too ("transposable masks",
    Hubara et al. 2021, "Accelerated Sparse Neural Training"). For a conv, tiles run over
    output and input channels at each kernel position.

    The mask of each tile is the best of all :func:`tile_patterns` (the patterns method of
    :func:`nm_mask_patterns`, in 2-D: one ``(tiles, m*m) @ (m*m, P)`` product, argmax per
    tile, lexicographically first on ties). ``m <= 4`` keeps ``P`` small (90 for 2:4).
    """

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.n}:{self.m}-2d"

    @property
    def rows_per_group(self) -> int:  # type: ignore[override]
        return self.m

    def incompatibility(self, layer: Layer) -> str | None:
        out = layer.canonical.shape[0]
        if out % self.m:
            return (
                f"{self.name} needs the output axis ({out}) to be a multiple of M={self.m}; "
                "exclude the layer or use 1-D N:M"
            )
        return super().incompatibility(layer)

    def keep(self, scores: Tensor) -> Tensor:
        """Bool keep-mask for canonical ``scores`` (rows a multiple of ``m``)."""
        m = self.m
        scores = scores.clamp(min=torch.finfo(scores.dtype).min / (m * m))
        moved = scores.movedim(1, -1).movedim(0, -2)  # (*kernel, out, in)
        out, width = moved.shape[-2:]
        tiles = moved.reshape(-1, out // m, m, width // m, m).permute(0, 1, 3, 2, 4)
        patterns = tile_patterns(self.n, m).to(device=scores.device, dtype=torch.float64)
        flat = tiles.reshape(-1, m * m).to(torch.float64)
        keep = patterns[(flat @ patterns.T).argmax(dim=1)].bool()
        keep = keep.reshape(tiles.shape).permute(0, 1, 3, 2, 4).reshape(moved.shape)
        return keep.movedim(-2, 0).movedim(-1, 1)


@cache
def tile_patterns(n: int, m: int) -> Tensor:
    """All ``m x m`` 0/1 tiles with ``n`` ones in every row and column, as ``(P, m*m)``
    floats in lexicographic order (each row one of :func:`keep_patterns`)."""
    rows = keep_patterns(n, m)
    tiles = [
        torch.stack(choice)
        for choice in itertools.product(rows, repeat=m)
        if bool((torch.stack(choice).sum(0) == n).all())
    ]
    return torch.stack(tiles).reshape(len(tiles), m * m)


@cache
def keep_patterns(n: int, m: int) -> Tensor:
    """All C(m, n) keep-patterns as a ``(C, m)`` 0/1 float matrix, lexicographic order."""
    rows = []
    for kept in itertools.combinations(range(m), n):
        row = [0.0] * m
        for i in kept:
            row[i] = 1.0
        rows.append(row)
    return torch.tensor(rows)


def nm_mask_patterns(scores: Tensor, n: int, m: int) -> Tensor:
    """The chapter's N:M method (Figure 3-4, corrected).

    ``scores`` is ``(groups, m)``. Score every group against every keep-pattern with
    one product ``(groups, m) @ (m, C)``, take the argmax over patterns *per group*
    (the first maximal pattern in lexicographic order on ties) and gather that pattern.
    """
    patterns = keep_patterns(n, m).to(device=scores.device, dtype=torch.float64)
    best = (scores.to(torch.float64) @ patterns.T).argmax(dim=1)
    return patterns[best].bool()


def nm_mask_topn(scores: Tensor, n: int, m: int) -> Tensor:
    """N:M by keeping the top-``n`` scores of each ``(groups, m)`` row.

    A stable descending sort breaks ties towards the lower index, which selects the
    lexicographically first optimal pattern: the same mask as :func:`nm_mask_patterns`.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(1, order, True)


_FIXED = {g.name: g for g in (Element(), Row(), Column(), Kernel(), Filter(), Channel())}
_NM = re.compile(r"^(\d+):(\d+)(-2d)?$")
_BLOCK = re.compile(r"^block:(\d+)x(\d+)$")
VALID = [
    *_FIXED,
    "N:M (e.g. '2:4')",
    "N:M-2d with M <= 4 (e.g. '2:4-2d')",
    "block:AxB (e.g. 'block:4x4')",
]


def parse(spec: str | Granularity) -> Granularity:
    """A :class:`Granularity` from its name (``"element"``, ``"2:4"``, ``"2:4-2d"``,
    ``"block:4x4"``...)."""
    if isinstance(spec, Granularity):
        return spec
    if not isinstance(spec, str):
        raise UnknownChoiceError("granularity", spec, VALID)
    key = spec.strip().lower()
    if key in _FIXED:
        return _FIXED[key]
    if match := _NM.match(key):
        n, m = int(match[1]), int(match[2])
        if 0 < n < m and not match[3]:
            return NM(n, m)
        if 0 < n < m <= 4:
            return NM2D(n, m)
    if (match := _BLOCK.match(key)) and int(match[1]) > 0 and int(match[2]) > 0:
        return Block(int(match[1]), int(match[2]))
    raise UnknownChoiceError("granularity", spec, VALID)
