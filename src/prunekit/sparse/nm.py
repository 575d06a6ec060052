"""Compressed N:M storage: the kept values plus packed index metadata.

For a 2-D weight ``(rows, cols)`` whose every group of ``m`` consecutive entries along
the reduction axis (a row) holds at most ``n`` nonzeros, store (NVIDIA Ampere's 2:4
layout, Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"):

* ``values``: ``(rows, cols / m * n)``, the ``n`` kept entries of every group in order;
* ``metadata``: for each kept value its position inside its group, ``b = ceil(log2 m)``
  bits (2 for M = 4), most significant bit first, packed 8 to a byte
  (:func:`prunekit.bits.pack`): ``ceil(rows * cols / m * n * b / 8)`` bytes.

Bytes = ``numel * n / m * e + ceil(numel * n / m * b / 8)``, exactly
:func:`prunekit.analysis.profile.nm_bytes`: 0.5x + 1/32x of the dense bytes for fp32 2:4. A group
with fewer than ``n`` nonzeros keeps some zeros (positions ascending), so
:meth:`NMTensor.to_dense` restores the weight exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from reprlib import repr as brief  # values from files can be huge

import torch
from torch import Tensor

from prunekit import bits
from prunekit.errors import CheckpointError, IncompatibleLayerError, NotNMError, first_line
from prunekit.sparse.base import (
    PAIR,
    SIZE,
    check_fields,
    check_tensor,
    read_tensors,
    write_tensors,
)

_HEADER = "prunekit.nm"


def index_bits(m: int) -> int:
    """``ceil(log2 m)``: bits that name a position inside a group of ``m``."""
    return (m - 1).bit_length()


def nm_violations(weight: Tensor, n: int, m: int) -> tuple[int, int]:
    """``(groups with more than n nonzeros, most nonzeros in one group)`` of 2-D ``weight``."""
    counts = weight.reshape(weight.shape[0], -1, m).ne(0).sum(-1)
    return int((counts > n).sum()), int(counts.max()) if counts.numel() else 0


@dataclass(frozen=True)
class NMTensor:
    """A 2-D N:M-sparse matrix in compressed form (see the module docstring)."""

    values: Tensor
    metadata: Tensor
    shape: tuple[int, int]
    n: int
    m: int

    @classmethod
    def compress(cls, weight: Tensor, n: int = 2, m: int = 4) -> NMTensor:
        """Compress a 2-D ``weight`` that is N:M along its rows.

        Raises:
            IncompatibleLayerError: ``m`` does not divide the number of columns.
            NotNMError: some group holds more than ``n`` nonzeros.
        """
        rows, cols = weight.shape
        if not 0 < n < m or cols % m:
            raise IncompatibleLayerError(
                f"{n}:{m} storage needs 0 < n < m and m dividing the {cols} columns; "
                "Fix: pick an M that divides the reduction axis."
            )
        bad, worst = nm_violations(weight, n, m)
        if bad:
            raise NotNMError(
                f"weight {rows}x{cols} is not {n}:{m}: {bad} group(s) of {m} hold more than "
                f"{n} nonzeros (up to {worst}); Fix: prune with granularity='{n}:{m}' first."
            )
        groups = weight.detach().reshape(rows, cols // m, m)
        # Nonzeros first (stable: lowest positions first), then ascending positions.
        first = torch.sort(groups.eq(0).to(torch.int8), dim=-1, stable=True).indices[..., :n]
        positions = first.sort(dim=-1).values
        values = groups.gather(-1, positions).reshape(rows, -1).contiguous()
        b = index_bits(m)
        shifts = torch.arange(b - 1, -1, -1, device=weight.device)
        flags = (positions.reshape(-1, 1) >> shifts).bitwise_and(1).bool()
        return cls(values, bits.pack(flags), (rows, cols), n, m)

    def positions(self) -> Tensor:
        """int64 ``(rows, cols / m, n)``: each kept value's position inside its group."""
        b = index_bits(self.m)
        kept = self.values.numel()
        flags = bits.unpack(self.metadata, (kept, b)).to(torch.int64)
        weights = 2 ** torch.arange(b - 1, -1, -1, device=flags.device)
        return (flags * weights).sum(-1).reshape(self.shape[0], -1, self.n)

    def columns(self) -> Tensor:
        """int64 ``(rows, cols / m * n)``: each kept value's column in the dense matrix."""
        positions = self.positions()
        starts = torch.arange(positions.shape[1], device=positions.device) * self.m
        return (positions + starts[:, None]).reshape(self.shape[0], -1)

    def to_dense(self) -> Tensor:
        """The exact dense matrix."""
        dense = self.values.new_zeros(self.shape)
        return dense.scatter_(1, self.columns(), self.values)

    @property
    def nbytes(self) -> int:
        """Bytes of values plus metadata."""
        return self.values.numel() * self.values.element_size() + self.metadata.numel()

    def check(self) -> None:
        """Refuse parts that disagree, or positions that leave their group, before any
        kernel reads them: ``0 < n < m`` with ``m`` dividing the columns, values of shape
        ``(rows, cols / m * n)``, exactly ``ceil(kept * b / 8)`` uint8 metadata bytes, and
        in every group positions below ``m`` and strictly increasing (so every column is
        in range, and each row's columns are sorted and distinct: the CSR invariants
        :class:`~prunekit.sparse.nm_linear.NMLinear` relies on).

        Raises:
            CheckpointError: naming what is wrong.
        """
        (rows, cols), n, m = self.shape, self.n, self.m
        if not 0 < n < m or cols % m:
            raise CheckpointError(f"{n}:{m} needs 0 < n < m and m dividing the {cols} columns")
        kept = rows * (cols // m) * n
        parts = {"values": self.values, "metadata": self.metadata}
        check_tensor(parts, "values", self.values.dtype, (rows, cols // m * n))
        check_tensor(parts, "metadata", torch.uint8, (-(-kept * index_bits(m) // 8),))
        positions = self.positions()
        if positions.numel() and bool((positions >= m).any() | (positions.diff(dim=-1) <= 0).any()):
            raise CheckpointError(
                f"metadata positions leave their group of {m} or are not increasing in it "
                f"(largest {int(positions.max())})"
            )

    def save(self, path: str | Path) -> None:
        """Write values and metadata to a safetensors file (shape, n, m in its header),
        atomically (:func:`~prunekit.sparse.base.write_tensors`)."""
        tensors = {"values": self.values.contiguous(), "metadata": self.metadata.contiguous()}
        write_tensors(path, tensors, _HEADER, {"shape": list(self.shape), "n": self.n, "m": self.m})

    @classmethod
    def load(cls, path: str | Path) -> NMTensor:
        """Read a file written by :meth:`save`, checking it first (:meth:`check`).

        Raises:
            CheckpointError: the file is not one :meth:`save` wrote (no ``prunekit.nm``
                header), is unreadable, truncated or corrupted, or its parts disagree.
        """
        header, tensors = read_tensors(path, _HEADER, "NMTensor.save")
        try:
            info = check_fields(header, {"shape": PAIR, "n": SIZE, "m": SIZE})
            if tensors.keys() != {"values", "metadata"}:
                raise CheckpointError(
                    f"tensors {brief(sorted(tensors))}, expected metadata, values"
                )
            loaded = cls(
                tensors["values"], tensors["metadata"], tuple(info["shape"]), info["n"], info["m"]
            )
            loaded.check()
        except CheckpointError as err:
            raise CheckpointError(
                f"{str(path)!r} is not a sound N:M tensor: {first_line(err)}; Fix: pass a "
                "file written by NMTensor.save (save it again if it was edited or corrupted)."
            ) from err
        return loaded
