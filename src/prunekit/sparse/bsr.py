"""BSR execution: ``W`` as compressed rows of dense ``bh x bw`` blocks (block pruning).

Only blocks holding a nonzero are stored: ``kept * bh * bw * e`` values + ``kept * 4``
int32 block-column indices + ``(out / bh + 1) * 4`` int32 block-row pointers. A block
mask (granularity ``"block:AxB"``, e.g. Narang et al. 2017 "Block-sparse RNNs") makes
this the format that beats dense earliest: each stored block is a small dense GEMM.

Two kernels compute the product; which is faster depends on the CPU (measured: MKL was
1.7x faster at batch 1 on the 2-core CI machine, the gather kernel 1.2-9x faster at batch
1-8 on a Xeon), so ``convert(format="auto")`` times both:

* ``"mkl"``: ``torch.sparse.mm`` on the BSR tensor (square blocks only);
* ``"gather"``: three torch ops, any block shape: gather the input block of every stored
  block, one batched matmul, ``index_add`` into the output block rows::

    y[r] = sum over stored blocks k in block-row r of  values[k] @ x[col[k] * bw : +bw]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from prunekit.errors import CheckpointError
from prunekit.sparse.base import (
    PAIR,
    Check,
    SparseLinear,
    check_compressed_rows,
    check_tensor,
    compressed_rows,
    dtype_from_name,
)

BLOCK_SIZES = (64, 32, 16, 8, 4, 2)
KERNELS = ("mkl", "gather")
MAX_FILL = 2.0


def kept_blocks(weight: Tensor, blocksize: tuple[int, int]) -> int:
    """Blocks of the 2-D ``weight`` (``blocksize`` divides it) holding a nonzero."""
    bh, bw = blocksize
    rows, cols = weight.shape
    return int(weight.reshape(rows // bh, bh, cols // bw, bw).ne(0).any(dim=(1, 3)).sum())


def bsr_bytes(weight: Tensor, blocksize: tuple[int, int]) -> int:
    """Bytes :class:`BSRLinear` would take for the 2-D ``weight`` (``blocksize`` divides it)."""
    kept = kept_blocks(weight, blocksize)
    bh, bw = blocksize
    return kept * bh * bw * weight.element_size() + kept * 4 + (weight.shape[0] // bh + 1) * 4


def best_blocksize(weight: Tensor) -> tuple[int, int] | None:
    """The largest square block from :data:`BLOCK_SIZES` that divides ``weight`` and stores
    at most :data:`MAX_FILL` values per nonzero, or None: a weight that is not block-sparse
    (90% unstructured needs 3.4x at 2x2) gains nothing from BSR."""
    rows, cols = weight.shape
    nnz = int(weight.count_nonzero())
    for b in BLOCK_SIZES:
        if (
            rows % b == 0
            and cols % b == 0
            and kept_blocks(weight, (b, b)) * b * b <= MAX_FILL * nnz
        ):
            return (b, b)
    return None


class BSRLinear(SparseLinear):
    """A Linear whose weight is stored in BSR with int32 indices."""

    format = "bsr"
    SPEC_FIELDS: ClassVar[dict[str, Check]] = {
        **SparseLinear.SPEC_FIELDS,
        "blocksize": PAIR,
        "kernel": (lambda v: v in KERNELS, f"one of {KERNELS}"),
    }

    def __init__(
        self,
        in_features: int,
        out_features: int,
        crow_indices: Tensor,
        col_indices: Tensor,
        values: Tensor,
        bias: Tensor | None = None,
        kernel: str = "mkl",
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.kernel = kernel
        self.register_buffer("crow_indices", crow_indices.to(torch.int32))
        self.register_buffer("col_indices", col_indices.to(torch.int32))
        self.register_buffer("values", values)
        self.register_buffer("block_rows", torch.zeros(0, dtype=torch.int32), persistent=False)
        self.decode()
        self.register_load_state_dict_post_hook(lambda module, keys: module.decode())

    def decode(self) -> None:
        """Rebuild the block-row index of every stored block from the row pointers."""
        rows = torch.arange(len(self.crow_indices) - 1, device=self.crow_indices.device)
        self.block_rows = rows.repeat_interleave(self.crow_indices.diff()).to(torch.int32)

    @property
    def blocksize(self) -> tuple[int, int]:
        return tuple(self.values.shape[1:])  # type: ignore[return-value]

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        blocksize: tuple[int, int],
        bias: Tensor | None = None,
        kernel: str = "mkl",
    ) -> BSRLinear:
        """Keep the ``blocksize`` blocks of a 2-D ``weight`` that hold a nonzero."""
        bsr = weight.detach().to_sparse_bsr(blocksize)
        out, inp = weight.shape
        values = bsr.values().clone()
        return cls(inp, out, bsr.crow_indices(), bsr.col_indices(), values, bias, kernel)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> BSRLinear:
        dtype = dtype_from_name(spec["dtype"])
        out, (bh, bw) = spec["out_features"], spec["blocksize"]
        bias = torch.zeros(out, dtype=dtype) if spec["bias"] else None
        crow = torch.zeros(out // bh + 1, dtype=torch.int32)
        values = torch.zeros(0, bh, bw, dtype=dtype)
        empty = torch.zeros(0, dtype=torch.int32)
        return cls(spec["in_features"], out, crow, empty, values, bias, spec["kernel"])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "blocksize": list(self.blocksize), "kernel": self.kernel}

    @classmethod
    def check_spec(cls, spec: object) -> dict[str, Any]:
        """The fields, and a block size that tiles the weight (square for ``"mkl"``)."""
        fields = super().check_spec(spec)
        (bh, bw), rows, cols = fields["blocksize"], fields["out_features"], fields["in_features"]
        if rows % bh or cols % bw or (fields["kernel"] == "mkl" and bh != bw):
            raise CheckpointError(
                f"spec blocksize {[bh, bw]} does not tile the {rows}x{cols} weight (or is "
                "not square for the 'mkl' kernel)"
            )
        return fields

    def check_state(self, state: Mapping[str, Tensor]) -> None:
        """int32 block-row pointers (one per block row plus one) and block-column indices,
        ``(blocks, bh, bw)`` values of the spec's dtype, and the BSR invariants."""
        super().check_state(state)
        (bh, bw), rows = self.blocksize, self.out_features
        crow = check_tensor(state, "crow_indices", torch.int32, (rows // bh + 1,))
        col = check_tensor(state, "col_indices", torch.int32, (None,))
        values = check_tensor(state, "values", self.dtype, (None, bh, bw))
        check_compressed_rows(torch.sparse_bsr, crow, col, values, (rows, self.in_features))

    def sparse_weight(self) -> Tensor:
        shape = (self.out_features, self.in_features)
        return compressed_rows(
            torch.sparse_bsr, self.crow_indices, self.col_indices, self.values, shape
        )

    def matmul(self, xt: Tensor) -> Tensor:
        if self.kernel == "mkl":
            return torch.sparse.mm(self.sparse_weight(), xt)
        bh, bw = self.blocksize
        cols = xt.shape[1]
        blocks = xt.reshape(self.in_features // bw, bw, cols).index_select(0, self.col_indices)
        out = xt.new_zeros(self.out_features // bh, bh, cols)
        out.index_add_(0, self.block_rows, self.values @ blocks)
        return out.reshape(self.out_features, cols)

    def to_dense(self) -> Tensor:
        return self.sparse_weight().to_dense()

    def describe(self) -> str:
        bh, bw = self.blocksize
        total = self.in_features * self.out_features // (bh * bw)
        kept = self.values.shape[0]
        sparsity = 1 - kept / max(total, 1)
        blocks = f"blocks={kept}/{total} ({sparsity:.1%} sparse)"
        return f"blocksize={bh}x{bw}, kernel={self.kernel}, {blocks}"
