"""N:M execution: on CPU from the compressed form, on CUDA sm80+ with 2:4 sparse cores.

:class:`NMLinear` stores only :class:`~prunekit.sparse.nm.NMTensor`'s values and packed
metadata (that is its ``state_dict``). Every output row keeps exactly ``in * n / m``
values, so the compressed form is a CSR matrix with a fixed row length: the values are
used in place, the column of each is ``group * m + position`` (decoded from the metadata
once, kept as a non-persistent int32 buffer) and the product is the CSR one
(:func:`~prunekit.sparse.base.csr_matmul`).
CPUs have no N:M instructions: at 2:4 (50%) this is slower than dense, which
``convert(format="auto")`` knows; the format exists for its bytes and for CUDA.

:class:`SemiStructuredLinear` wraps ``torch.sparse.to_sparse_semi_structured`` (2:4 in
fp16 / bf16 on compute capability >= 8.0; Mishra et al. 2021).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.sparse import to_sparse_semi_structured

from prunekit.errors import CheckpointError, CudaRequiredError
from prunekit.sparse.base import (
    SIZE,
    Check,
    SparseLinear,
    check_tensor,
    compressed_rows,
    csr_matmul,
    dtype_from_name,
)
from prunekit.sparse.nm import NMTensor, index_bits


class NMLinear(SparseLinear):
    """A Linear whose weight is stored N:M-compressed (values + packed positions)."""

    format = "nm"
    SPEC_FIELDS: ClassVar[dict[str, Check]] = {**SparseLinear.SPEC_FIELDS, "n": SIZE, "m": SIZE}

    def __init__(self, weight: NMTensor, bias: Tensor | None = None) -> None:
        out, inp = weight.shape
        super().__init__(inp, out, bias)
        self.n, self.m = weight.n, weight.m
        self.register_buffer("values", weight.values)
        self.register_buffer("metadata", weight.metadata)
        self.register_buffer("columns", torch.zeros(0, dtype=torch.int32), persistent=False)
        self.register_buffer("crow_indices", torch.zeros(0, dtype=torch.int32), persistent=False)
        self.decode()
        self.register_load_state_dict_post_hook(lambda module, keys: module.decode())

    @classmethod
    def from_dense(cls, weight: Tensor, n: int, m: int, bias: Tensor | None = None) -> NMLinear:
        return cls(NMTensor.compress(weight.detach(), n, m), bias)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> NMLinear:
        dtype = dtype_from_name(spec["dtype"])
        out, inp, n, m = spec["out_features"], spec["in_features"], spec["n"], spec["m"]
        kept = out * inp // m * n
        meta = torch.zeros(-(-kept * index_bits(m) // 8), dtype=torch.uint8)
        compressed = NMTensor(torch.zeros(out, inp // m * n, dtype=dtype), meta, (out, inp), n, m)
        return cls(compressed, torch.zeros(out, dtype=dtype) if spec["bias"] else None)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "n": self.n, "m": self.m}

    @classmethod
    def check_spec(cls, spec: object) -> dict[str, Any]:
        """The fields, ``0 < n < m`` and ``m`` dividing the inputs."""
        fields = super().check_spec(spec)
        n, m, cols = fields["n"], fields["m"], fields["in_features"]
        if not n < m or cols % m:
            raise CheckpointError(f"spec {n}:{m} needs n < m and m dividing the {cols} inputs")
        return fields

    def check_state(self, state: Mapping[str, Tensor]) -> None:
        """Values and metadata of the spec's dtype and shapes, and sound positions
        (:meth:`NMTensor.check`)."""
        super().check_state(state)
        values = check_tensor(state, "values", self.dtype, tuple(self.values.shape))
        metadata = check_tensor(state, "metadata", torch.uint8, tuple(self.metadata.shape))
        shape = (self.out_features, self.in_features)
        NMTensor(values, metadata, shape, self.n, self.m).check()

    def compressed(self) -> NMTensor:
        """The stored weight as an :class:`NMTensor` (sharing this module's tensors)."""
        shape = (self.out_features, self.in_features)
        return NMTensor(self.values, self.metadata, shape, self.n, self.m)

    def decode(self) -> None:
        """Rebuild the int32 CSR column indices and row pointers from the metadata."""
        columns = self.compressed().columns()
        per_row = columns.shape[1]
        device = self.values.device
        self.columns = columns.reshape(-1).to(device=device, dtype=torch.int32)
        self.crow_indices = torch.arange(
            0, self.out_features * per_row + 1, per_row, dtype=torch.int32, device=device
        )

    def matmul(self, xt: Tensor) -> Tensor:
        shape = (self.out_features, self.in_features)
        values = self.values.reshape(-1)
        csr = compressed_rows(torch.sparse_csr, self.crow_indices, self.columns, values, shape)
        return csr_matmul(csr, xt)

    def to_dense(self) -> Tensor:
        return self.compressed().to_dense()

    def describe(self) -> str:
        return f"{self.n}:{self.m}, {index_bits(self.m)}-bit indices"


def require_semi_structured(device: torch.device | None = None) -> torch.device:
    """The CUDA device 2:4 sparse cores run on, or :class:`CudaRequiredError`."""
    if not torch.cuda.is_available():
        raise CudaRequiredError(
            "format 'nm-cuda' (torch.sparse.to_sparse_semi_structured, 2:4 sparse tensor "
            "cores) needs a CUDA GPU of compute capability >= 8.0 and none is available; "
            "Fix: use format='nm' (CPU, compressed) or 'auto', or run on an Ampere+ GPU."
        )
    device = device or torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise CudaRequiredError(
            f"format 'nm-cuda' needs compute capability >= 8.0, {device} has {major}.{minor}; "
            "Fix: use format='nm' or 'auto'."
        )
    return device


class SemiStructuredLinear(nn.Module):
    """A 2:4 Linear on CUDA sparse tensor cores (fp16 / bf16 weights, sm80+)."""

    format = "nm-cuda"

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        device = require_semi_structured(weight.device if weight.is_cuda else None)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(
            to_sparse_semi_structured(weight.detach().to(device)), requires_grad=False
        )
        self.bias = None if bias is None else nn.Parameter(bias.to(device), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, 2:4 semi-structured on {self.weight.device}"
        )
