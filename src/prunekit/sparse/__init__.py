"""Sparse execution and storage: turn pruned weights into bytes and time saved.

    import prunekit as pk
    pk.prune(model, 0.9)
    report = pk.sparse.convert(model, "auto", batch_size=1)   # or "csr", "bsr", "nm", ...
    print(report)
    pk.sparse.save(model, "model.safetensors")
    pk.sparse.load(build_model(), "model.safetensors")

Modules: :class:`CSRLinear`, :class:`BSRLinear`, :class:`NMLinear` (CPU, compressed N:M),
:class:`SemiStructuredLinear` (CUDA 2:4), :class:`SparseConv2d` (im2col). Storage:
:class:`NMTensor` (values + packed indices). Channel permutations for N:M:
:func:`permute_channels`.
"""

from prunekit.sparse.bsr import BSRLinear
from prunekit.sparse.conv import SparseConv2d
from prunekit.sparse.convert import FORMATS, ConvertReport, convert
from prunekit.sparse.cost import CostFn, MeasuredCost
from prunekit.sparse.csr import CSRLinear
from prunekit.sparse.io import load, save
from prunekit.sparse.nm import NMTensor
from prunekit.sparse.nm_linear import NMLinear, SemiStructuredLinear
from prunekit.sparse.permute import PermutationReport, permute_channels

__all__ = [
    "FORMATS",
    "BSRLinear",
    "CSRLinear",
    "ConvertReport",
    "CostFn",
    "MeasuredCost",
    "NMLinear",
    "NMTensor",
    "PermutationReport",
    "SemiStructuredLinear",
    "SparseConv2d",
    "convert",
    "load",
    "permute_channels",
    "save",
]
