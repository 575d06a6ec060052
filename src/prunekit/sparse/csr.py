"""CSR execution: ``W`` as compressed sparse rows, ``y^T = W_csr @ x^T``.

Bytes: ``nnz * e`` values + ``nnz * 4`` int32 column indices + ``(out + 1) * 4`` int32
row pointers (:func:`prunekit.analysis.profile.csr_bytes`). On this CPU the product only
beats dense from ~80-90% sparsity, and only as ``torch.sparse.mm(W_csr, x.T)`` with int32
indices (measured in BENCHMARKS.md), or ``torch.mv(W_csr, x)`` for a single input row. The
sparse tensor is rebuilt from the buffers on every call (a few microseconds, no copy), so
the module works under ``torch.inference_mode`` whatever mode it was built in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from prunekit.sparse.base import (
    SparseLinear,
    check_compressed_rows,
    check_tensor,
    compressed_rows,
    csr_matmul,
    dtype_from_name,
)


class CSRLinear(SparseLinear):
    """A Linear whose weight is stored in CSR with int32 indices."""

    format = "csr"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        crow_indices: Tensor,
        col_indices: Tensor,
        values: Tensor,
        bias: Tensor | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("crow_indices", crow_indices.to(torch.int32))
        self.register_buffer("col_indices", col_indices.to(torch.int32))
        self.register_buffer("values", values)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None) -> CSRLinear:
        """Keep the nonzeros of a 2-D ``weight`` ``(out, in)``."""
        csr = weight.detach().to_sparse_csr()
        out, inp = weight.shape
        return cls(inp, out, csr.crow_indices(), csr.col_indices(), csr.values().clone(), bias)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> CSRLinear:
        dtype = dtype_from_name(spec["dtype"])
        out = spec["out_features"]
        bias = torch.zeros(out, dtype=dtype) if spec["bias"] else None
        empty = torch.zeros(0, dtype=torch.int32)
        crow = torch.zeros(out + 1, dtype=torch.int32)
        return cls(spec["in_features"], out, crow, empty, torch.zeros(0, dtype=dtype), bias)

    def check_state(self, state: Mapping[str, Tensor]) -> None:
        """int32 row pointers (one per row plus one) and column indices, values of the
        spec's dtype, and the CSR invariants (:func:`check_compressed_rows`)."""
        super().check_state(state)
        crow = check_tensor(state, "crow_indices", torch.int32, (self.out_features + 1,))
        col = check_tensor(state, "col_indices", torch.int32, (None,))
        values = check_tensor(state, "values", self.dtype, (None,))
        shape = (self.out_features, self.in_features)
        check_compressed_rows(torch.sparse_csr, crow, col, values, shape)

    def sparse_weight(self) -> Tensor:
        shape = (self.out_features, self.in_features)
        return compressed_rows(
            torch.sparse_csr, self.crow_indices, self.col_indices, self.values, shape
        )

    def matmul(self, xt: Tensor) -> Tensor:
        return csr_matmul(self.sparse_weight(), xt)

    def to_dense(self) -> Tensor:
        return self.sparse_weight().to_dense()

    def describe(self) -> str:
        numel = self.in_features * self.out_features
        return f"nnz={self.values.numel():,} ({1 - self.values.numel() / numel:.1%} sparse)"
