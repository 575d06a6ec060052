"""Build the sparse module of one layer in one format, validating first.

``build`` reads the layer's effective weight (:mod:`prunekit.sparse.gemm`), checks that
the format fits it and raises a :class:`~prunekit.PruningError` naming the layer, the value
and the fix when it does not; it never modifies the layer. ``from_spec`` rebuilds an empty
module of the same kind from :meth:`spec` (for loading).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunekit.cost import csr_bytes, nm_bytes
from prunekit.errors import (
    IncompatibleLayerError,
    NotNMError,
    NotSparseEnoughError,
    first_line,
)
from prunekit.masks import bake
from prunekit.sparse.base import SparseLinear, dtype_from_name
from prunekit.sparse.bsr import (
    BLOCK_SIZES,
    MAX_FILL,
    BSRLinear,
    best_blocksize,
    bsr_bytes,
)
from prunekit.sparse.conv import SparseConv2d
from prunekit.sparse.csr import CSRLinear
from prunekit.sparse.gemm import base_type, gemm_bias, gemm_weight
from prunekit.sparse.nm import nm_violations
from prunekit.sparse.nm_linear import NMLinear, SemiStructuredLinear

SPARSE_FORMATS = ("csr", "bsr", "nm", "nm-cuda")
LINEAR_TYPES: dict[str, type[SparseLinear]] = {"csr": CSRLinear, "bsr": BSRLinear, "nm": NMLinear}


@dataclass(frozen=True)
class Options:
    """Format parameters: N:M pattern, BSR block size (None: :func:`best_blocksize`) and
    BSR kernel (``"mkl"`` or ``"gather"``)."""

    n: int = 2
    m: int = 4
    blocksize: tuple[int, int] | None = None
    bsr_kernel: str = "mkl"


def _too_dense(name: str, fmt: str, weight: Tensor, nbytes: int, detail: str = "") -> None:
    dense = _nbytes(weight)
    if nbytes >= dense:
        sparsity = 1 - int(weight.count_nonzero()) / weight.numel()
        raise NotSparseEnoughError(
            f"layer {name!r} is {sparsity:.1%} sparse{detail}: as {fmt} it would take "
            f"{nbytes:,} bytes, more than dense ({dense:,}); Fix: prune it further, exclude "
            "it, or use format='auto' (which keeps it dense)."
        )


def _check_nm(name: str, weight: Tensor, opts: Options) -> None:
    cols = weight.shape[1]
    if cols % opts.m:
        raise IncompatibleLayerError(
            f"layer {name!r}: {opts.n}:{opts.m} needs its reduction axis ({cols}) to be a "
            f"multiple of M={opts.m}; Fix: exclude the layer or pick an M that divides it."
        )
    bad, worst = nm_violations(weight, opts.n, opts.m)
    if bad:
        raise NotNMError(
            f"layer {name!r} is not {opts.n}:{opts.m}: {bad} group(s) of {opts.m} inputs hold "
            f"more than {opts.n} nonzeros (up to {worst}); Fix: pk.prune(model, "
            f"granularity='{opts.n}:{opts.m}') first, or use format='csr' / 'auto'."
        )


def _check_kernel(name: str, fmt: str, gemm: SparseLinear) -> SparseLinear:
    """``gemm`` once one and two rows have run through it: which sparse kernels exist
    depends on the dtype, the device and the torch build (CPU has none for float16 or
    bfloat16), so the only sound check is to call them (batch 1 and batch > 1 take
    different kernels)."""
    values = gemm.values
    try:
        with torch.no_grad():
            for rows in (1, 2):
                gemm(torch.zeros(rows, gemm.in_features, dtype=values.dtype, device=values.device))
    except (NotImplementedError, RuntimeError) as err:
        raise IncompatibleLayerError(
            f"layer {name!r}: format {fmt!r} has no {values.dtype} kernel on "
            f"{values.device.type} ({first_line(err)}); Fix: convert "
            "a float32 copy (model.float()), or use format='auto' (keeps such layers dense)."
        ) from err
    return gemm


def _gemm(
    name: str, fmt: str, weight: Tensor, opts: Options, bias: Tensor | None = None
) -> SparseLinear:
    """The :class:`SparseLinear` of a 2-D ``weight`` in ``fmt``, checked to run."""
    return _check_kernel(name, fmt, _sparse(name, fmt, weight, opts, bias))


def _sparse(
    name: str, fmt: str, weight: Tensor, opts: Options, bias: Tensor | None = None
) -> SparseLinear:
    rows, cols = weight.shape
    if fmt == "csr":
        _too_dense(
            name, fmt, weight, csr_bytes(int(weight.count_nonzero()), rows, weight.element_size())
        )
        return CSRLinear.from_dense(weight, bias)
    if fmt == "bsr":
        size = opts.blocksize or best_blocksize(weight)
        if size is None:
            raise NotSparseEnoughError(
                f"layer {name!r} is not block-sparse: no square block of {BLOCK_SIZES} divides "
                f"its {rows}x{cols} weight storing at most {MAX_FILL:g} values per nonzero; "
                "Fix: prune with granularity='block:32x32' (and pass that blocksize), or use "
                "format='csr' / 'auto'."
            )
        if rows % size[0] or cols % size[1]:
            raise IncompatibleLayerError(
                f"layer {name!r}: block size {size} does not tile its {rows}x{cols} weight; "
                "Fix: pass blocksize=(a, b) dividing both (the block you pruned with)."
            )
        if opts.bsr_kernel == "mkl" and size[0] != size[1]:
            raise IncompatibleLayerError(
                f"layer {name!r}: block size {size[0]}x{size[1]} is not square and MKL's BSR "
                "product needs square blocks; Fix: bsr_kernel='gather' (any block shape)."
            )
        detail = f" in {size[0]}x{size[1]} blocks"
        _too_dense(name, fmt, weight, bsr_bytes(weight, size), detail)
        return BSRLinear.from_dense(weight, size, bias, opts.bsr_kernel)
    _check_nm(name, weight, opts)
    return NMLinear.from_dense(weight, opts.n, opts.m, bias)


def build(name: str, module: nn.Module, fmt: str, opts: Options) -> nn.Module:
    """``module`` (Linear, or Conv2d with groups=1) in format ``fmt`` (see module docstring).

    ``"dense"`` gives the module itself when unmasked, else a baked copy (no mask cost).
    """
    if fmt == "dense":
        # One layer, not the model: the dense module must not share (and strip) the
        # caller's masks.
        return bake(copy.deepcopy(module)) if parametrize.is_parametrized(module) else module
    if fmt == "nm-cuda":
        if base_type(module) is not nn.Linear:
            raise IncompatibleLayerError(
                f"layer {name!r}: format 'nm-cuda' converts Linear layers only; "
                "Fix: exclude it or use format='nm'."
            )
        weight = gemm_weight(module)
        _check_nm(name, weight, Options(2, 4))
        return SemiStructuredLinear(weight, gemm_bias(module))
    weight = gemm_weight(module, kernel_major=fmt == "nm")
    if base_type(module) is nn.Linear:
        return _gemm(name, fmt, weight, opts, gemm_bias(module))
    gemm = _gemm(name, fmt, weight, opts)
    geometry = SparseConv2d.conv_spec(module, kernel_major=fmt == "nm")
    return SparseConv2d(geometry, gemm, gemm_bias(module))


def from_spec(spec: dict[str, Any]) -> nn.Module:
    """An empty module of the kind :meth:`spec` describes, ready for ``load_state_dict``."""
    if spec["format"] == "conv2d":
        gemm = from_spec(spec["gemm"])
        dtype = dtype_from_name(spec["gemm"]["dtype"])
        conv = spec["conv"]
        bias = torch.zeros(conv["out_channels"], dtype=dtype) if conv["bias"] else None
        return SparseConv2d(conv, gemm, bias)  # type: ignore[arg-type]
    return LINEAR_TYPES[spec["format"]].from_spec(spec)


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def module_bytes(module: nn.Module) -> int:
    """Bytes of a converted layer's weight and bias as stored."""
    if isinstance(module, SparseLinear):
        return module.nbytes()
    if isinstance(module, SparseConv2d):
        return module.gemm.nbytes() + _nbytes(module.bias)
    if isinstance(module, SemiStructuredLinear):
        numel = module.in_features * module.out_features
        return nm_bytes(numel, module.weight.element_size()) + _nbytes(module.bias)
    return _nbytes(module.weight) + _nbytes(getattr(module, "bias", None))


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
