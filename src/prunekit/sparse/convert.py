"""``pk.sparse.convert``: replace pruned layers by modules that compute the same outputs
from a sparse representation, and report what each layer became and why."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from rich.table import Table
from torch import Tensor, nn
from torch.nn import functional as F

from prunekit.errors import IncompatibleLayerError, PruningError, UnknownChoiceError, guarded
from prunekit.granularity import NM, parse
from prunekit.layers import Layer, Selector, check_weight, require_unique_modules, select_layers
from prunekit.sparse.base import SparseLinear
from prunekit.sparse.bsr import KERNELS
from prunekit.sparse.conv import SparseConv2d
from prunekit.sparse.cost import Candidate, CostFn, MeasuredCost, choose
from prunekit.sparse.formats import SPARSE_FORMATS, Options, build, module_bytes, set_module
from prunekit.sparse.gemm import base_type, gemm_weight, unsupported
from prunekit.spec import checked, integer
from prunekit.tables import TableReport

FORMATS = ["auto", "dense", *SPARSE_FORMATS]
MAX_BLOCK = 2**16  # a BSR block side; larger blocks than any weight's side cannot tile it
BATCH = integer(1, 2**20)  # rows per call: auto times the formats on a batch of this size
# auto's candidates: name -> (format, BSR kernel); both BSR kernels are timed.
AUTO_CANDIDATES = {
    "csr": ("csr", "mkl"),
    "bsr": ("bsr", "mkl"),
    "bsr-gather": ("bsr", "gather"),
    "nm": ("nm", "mkl"),
}


@dataclass(frozen=True)
class LayerChoice:
    """What one layer became: format, bytes before/after, why, and the costs weighed."""

    name: str
    kind: str
    shape: tuple[int, int]
    sparsity: float
    format: str
    dense_bytes: int
    bytes: int
    reason: str = ""
    costs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ConvertReport(TableReport):
    """Per-layer choices of :func:`convert`; ``fallbacks`` are the layers left dense."""

    text_width = 160

    format: str
    batch_size: int
    layers: list[LayerChoice]

    @property
    def fallbacks(self) -> list[tuple[str, str]]:
        """``(layer, reason)`` for every layer that stayed dense."""
        return [(c.name, c.reason) for c in self.layers if c.format == "dense"]

    @property
    def formats(self) -> dict[str, str]:
        return {c.name: c.format for c in self.layers}

    @property
    def dense_bytes(self) -> int:
        return sum(c.dense_bytes for c in self.layers)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.layers)

    def table(self) -> Table:
        title = (
            f"sparse.convert: format={self.format}, batch {self.batch_size}, "
            f"bytes {self.bytes:,} = {self.bytes / max(self.dense_bytes, 1):.3f}x dense"
        )
        table = Table(title=title)
        for col in ("layer", "type", "GEMM", "sparsity", "format", "bytes vs dense", "why"):
            table.add_column(col)
        for c in self.layers:
            table.add_row(
                c.name,
                c.kind,
                "x".join(map(str, c.shape)),
                f"{c.sparsity:.1%}",
                c.format,
                f"{c.bytes / max(c.dense_bytes, 1):.3f}x",
                c.reason,
            )
        return table


def _options(nm: str, blocksize: int | tuple[int, int] | None, bsr_kernel: str) -> Options:
    gran = parse(nm)
    if not isinstance(gran, NM):
        raise UnknownChoiceError("nm pattern", nm, ["N:M (e.g. '2:4')"])
    pair = (blocksize, blocksize) if isinstance(blocksize, int) else blocksize
    if blocksize is not None:
        ok = isinstance(pair, tuple | list) and len(pair) == 2
        if not ok or not all(type(b) is int and 0 < b <= MAX_BLOCK for b in pair):
            raise PruningError(
                f"blocksize={blocksize!r} is not an int 1..{MAX_BLOCK} or a pair of them; Fix: "
                "pass the block you pruned with, e.g. blocksize=32 for granularity='block:32x32'."
            )
        blocksize = (pair[0], pair[1])
    if bsr_kernel not in KERNELS:
        raise UnknownChoiceError("bsr_kernel", bsr_kernel, list(KERNELS))
    return Options(gran.n, gran.m, blocksize, bsr_kernel)


def _check_args(format: str, batch_size: int, margin: float) -> None:
    if format not in FORMATS:
        raise UnknownChoiceError("format", format, FORMATS)
    checked("sparse.convert", "batch_size", batch_size, BATCH)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 < margin <= 1:
        raise PruningError(f"margin={margin!r} must be in (0, 1]: sparse must beat dense")


def _user_cost(cost: CostFn) -> CostFn:
    """The user's ``cost(candidate)``, named in a UserCallbackError when it raises, and
    refused when it returns no number."""
    call = guarded(cost, f"cost {getattr(cost, '__qualname__', None) or repr(cost)}")

    def checked(candidate: Candidate) -> float:
        value = call(candidate)
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            number = math.nan
        if math.isnan(number):
            raise PruningError(
                f"cost(candidate {candidate.layer!r} as {candidate.format!r}) returned "
                f"{value!r}, not a number; Fix: return its cost as a float (lower is better)."
            )
        return number

    return checked


def _runner(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The layer's GEMM as it will run, on ``x`` of shape ``(batch, in)``."""
    if isinstance(module, SparseConv2d):
        return module.gemm
    if isinstance(module, SparseLinear) or base_type(module) is nn.Linear:
        return module
    weight = gemm_weight(module)
    return lambda x: F.linear(x, weight)


def _auto(
    layer: Layer,
    shape: tuple[int, int],
    sparsity: float,
    opts: Options,
    *,
    batch_size: int,
    cost: CostFn,
    margin: float,
) -> tuple[nn.Module, str, dict[str, float]]:
    """``(module, reason, costs)`` for one layer with GEMM ``shape`` and ``sparsity``
    under ``format="auto"``."""
    built, skipped = {"dense": build(layer.name, layer.module, "dense", opts)}, []
    for key, (fmt, kernel) in AUTO_CANDIDATES.items():
        try:
            built[key] = build(layer.name, layer.module, fmt, replace(opts, bsr_kernel=kernel))
        except PruningError as err:
            skipped.append(f"{key}: {type(err).__name__}")
    if len(built) == 1:
        return built["dense"], f"no sparse format fits ({'; '.join(skipped)})", {}
    costs = {}
    for key, module in built.items():
        block = getattr(getattr(module, "gemm", module), "blocksize", None)
        detail = f"{opts.n}:{opts.m}" if key == "nm" else f"{block}" if block else ""
        weight = layer.weight
        run = _runner(module)
        candidate = Candidate(
            layer.name, key, shape, sparsity, batch_size, detail, run, weight.dtype, weight.device
        )
        costs[key] = float(cost(candidate))
    fmt, reason = choose(costs, margin)
    return built[fmt], reason, costs


def convert(
    model: nn.Module,
    format: str = "auto",
    *,
    batch_size: int = 1,
    layers: Selector = None,
    exclude: Selector = None,
    nm: str = "2:4",
    blocksize: int | tuple[int, int] | None = None,
    bsr_kernel: str = "mkl",
    cost: CostFn | None = None,
    margin: float = 0.9,
) -> ConvertReport:
    """Replace the selected Linear / Conv2d layers by sparse modules, in place.

    Each converted module computes the masked (or baked) dense layer's outputs (same
    values up to float summation order) from a sparse representation:

    * ``"csr"``: :class:`~prunekit.sparse.CSRLinear`, ``torch.sparse.mm`` (``torch.mv`` at
      batch 1) with int32 indices;
    * ``"bsr"``: :class:`~prunekit.sparse.BSRLinear`, ``blocksize`` blocks (default: the
      largest square block in 64..2 with at most 2 stored values per nonzero) computed by
      ``bsr_kernel`` (``"mkl"``, square blocks, or ``"gather"``); for block-pruned weights;
    * ``"nm"``: :class:`~prunekit.sparse.NMLinear` from the compressed ``nm`` form
      (values + ``ceil(log2 M)``-bit positions);
    * ``"nm-cuda"``: 2:4 sparse tensor cores (``to_sparse_semi_structured``, CUDA sm80+);
    * ``"dense"``: the layer with its zeros baked in (no mask cost);
    * ``"auto"``: per layer, the cheapest format under ``cost`` at ``batch_size`` (default
      :class:`~prunekit.sparse.MeasuredCost`) among csr, bsr (both kernels) and nm, dense
      unless a sparse one costs at most ``margin`` x dense.

    Convs become :class:`~prunekit.sparse.SparseConv2d` (im2col); other layer types stay
    as they are and are reported. With an explicit format every selected layer must fit
    it (``layers`` / ``exclude`` choose which); with ``"auto"`` misfits stay dense.

    Returns:
        A :class:`ConvertReport` of every selected layer's format, bytes and reason.

    Raises:
        UnknownChoiceError: an unknown format; before any layer is replaced.
        NoLayersError: ``layers`` / ``exclude`` select nothing (model unchanged).
        IncompatibleLayerError: a selected layer the format cannot hold (model unchanged).
        NotSparseEnoughError: a layer too dense for the format (model unchanged).
        NotNMError: a layer that is not N:M for ``nm`` (model unchanged).
        CudaRequiredError: a CUDA-only format on CPU (model unchanged).

    Example:
        >>> pk.prune(model, 0.9)
        >>> report = pk.sparse.convert(model, "auto", batch_size=1)
    """
    _check_args(format, batch_size, margin)
    opts = _options(nm, blocksize, bsr_kernel)
    chosen = select_layers(model, layers, exclude)
    require_unique_modules(chosen)
    cost = MeasuredCost() if cost is None else _user_cost(cost)
    planned: list[tuple[Layer, nn.Module, LayerChoice]] = []
    for layer in chosen:
        reason = unsupported(layer.module)
        if reason is None and layer.name == "":
            reason = "the model itself is the layer; wrap it in nn.Sequential to convert it"
        if reason is not None and layers is not None and format not in ("auto", "dense"):
            raise IncompatibleLayerError(f"layer {layer.name!r}: {reason}; Fix: exclude it.")
        check_weight(layer)
        with torch.no_grad():
            weight = layer.module.weight.detach()
            sparsity = 1 - int(weight.count_nonzero()) / weight.numel()
        dense = module_bytes(layer.module)
        shape = (weight.shape[0], math.prod(weight.shape[1:]))
        if reason is not None:
            choice = LayerChoice(
                layer.name, layer.kind, shape, sparsity, "dense", dense, dense, reason
            )
            planned.append((layer, layer.module, choice))
            continue
        costs: dict[str, float] = {}
        if format == "auto":
            new, reason, costs = _auto(
                layer, shape, sparsity, opts, batch_size=batch_size, cost=cost, margin=margin
            )
        else:
            new, reason = build(layer.name, layer.module, format, opts), "asked"
        fmt = getattr(new, "format", "dense")
        choice = LayerChoice(
            layer.name, layer.kind, shape, sparsity, fmt, dense, module_bytes(new), reason, costs
        )
        planned.append((layer, new, choice))
    for layer, new, _ in planned:
        if new is not layer.module:
            set_module(model, layer.name, new)
    return ConvertReport(format, batch_size, [choice for _, _, choice in planned])
