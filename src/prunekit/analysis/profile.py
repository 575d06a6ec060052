"""Measure what pruning bought: parameters, bytes, MACs and latency, per layer and in total.

For each prunable layer, with ``W`` its effective weight (the masked one when a mask is
registered), ``b`` its bias, ``e`` an element size in bytes and ``(rows, cols)`` the
2-D GEMM view of the canonical weight ``(out, in * prod(kernel))``:

==================  ===========================================================
params              ``numel(W) + numel(b)``
nonzero             ``nnz(W) + nnz(b)``
sparsity            ``1 - nnz(W) / numel(W)`` (of the weight only)
dense bytes         ``numel(W) * e + numel(b) * e_b``
CSR bytes           ``nnz(W) * e + nnz(W) * 4 + (rows + 1) * 4`` + dense bias
                    (values, int32 column indices, int32 row pointers)
2:4 bytes           :func:`~prunekit.cost.nm_bytes` ``(numel(W), e, 2, 4)`` + dense bias, or
                    None unless 4 divides the reduction (input) axis of the canonical weight
MACs                FLOPs / 2 of the layer, :func:`prunekit.cost.macs_per_module`
effective MACs      ``MACs * nnz(W) / numel(W)``
==================  ===========================================================

The total row sums the layers (a weight shared by several layers counts once), except
for MACs: total MACs are the whole model's, non-prunable ops included, and total
effective MACs are ``total MACs - sum(layer MACs * layer sparsity)``.

Masked zeros are still multiplied by dense kernels: MACs and latency of a masked model
are those of the dense one. Effective MACs and the CSR / 2:4 bytes are what a sparse
kernel or storage format could reach, not what the model runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from rich.table import Table
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunekit.analysis.timing import MIN_RUN_TIME, measure_latency
from prunekit.analysis.timing import measure_latencies as measure_latencies  # re-exported
from prunekit.cost import count_macs as count_macs  # re-exported for callers of this module
from prunekit.cost import csr_bytes, macs_per_module, nm_bytes
from prunekit.errors import InvalidInputsError, NoLayersError, PruningError, first_line
from prunekit.inputs import Inputs, eval_mode
from prunekit.layers import (
    Layer,
    Selector,
    require_model,
    select_layers,
    to_canonical,
    weight_param,
)
from prunekit.spec import checked
from prunekit.tables import TableReport

_NOTE = (
    "Masked zeros do not make dense kernels faster: MACs and latency are the dense "
    "computation's; eff. MACs, CSR KB and 2:4 KB are what sparse kernels or formats could "
    "reach. Total MACs include non-prunable ops."
)

_NUMERIC_COLUMNS = (
    "params",
    "nonzero",
    "sparsity %",
    "dense KB",
    "CSR KB",
    "2:4 KB",
    "MACs",
    "eff. MACs",
)


@dataclass(frozen=True)
class LayerProfile:
    """Counts of one prunable layer, or of the whole selection (``name == "total"``)."""

    name: str
    kind: str
    params: int
    nonzero: int
    weight_params: int
    weight_nonzero: int
    dense_bytes: int
    csr_bytes: int
    nm_bytes: int | None
    macs: int
    effective_macs: float

    @property
    def sparsity(self) -> float:
        """Fraction of zero weight entries: ``1 - weight_nonzero / weight_params``."""
        return 1.0 - self.weight_nonzero / max(self.weight_params, 1)

    def to_dict(self) -> dict[str, object]:
        """Plain, JSON-serialisable fields, ``sparsity`` included."""
        return {**asdict(self), "sparsity": self.sparsity}


@dataclass(frozen=True)
class Profile(TableReport):
    """Per-layer counts, their total and the measured latency of the whole model."""

    text_width = 160

    layers: list[LayerProfile]
    total: LayerProfile
    latency_s: float | None

    @property
    def total_macs(self) -> int:
        """Dense MACs of one forward pass of the whole model."""
        return self.total.macs

    @property
    def effective_macs(self) -> float:
        """``total_macs - sum(layer.macs * layer.sparsity)``."""
        return self.total.effective_macs

    def to_dict(self) -> dict[str, object]:
        """Plain dict / list / int / float structure (``json.dumps`` accepts it)."""
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "total": self.total.to_dict(),
            "latency_s": self.latency_s,
            "total_macs": self.total_macs,
            "effective_macs": self.effective_macs,
        }

    def table(self) -> Table:
        """A rich table, one row per layer plus the total, captioned with the latency."""
        table = Table(title="prunekit profile", caption=f"{_latency_text(self.latency_s)}\n{_NOTE}")
        table.add_column("layer")
        table.add_column("type")
        for header in _NUMERIC_COLUMNS:
            table.add_column(header, justify="right")
        for layer in self.layers:
            table.add_row(*_cells(layer))
        table.add_section()
        table.add_row(*_cells(self.total), style="bold")
        return table


def _latency_text(latency_s: float | None) -> str:
    if latency_s is None:
        return "Latency: not measured."
    return f"Latency (whole model, median): {latency_s * 1e3:.3f} ms"


def _kb(n_bytes: int | None) -> str:
    return "—" if n_bytes is None else f"{n_bytes / 1024:,.1f}"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _cells(p: LayerProfile) -> tuple[str, ...]:
    return (
        p.name,
        p.kind,
        f"{p.params:,}",
        f"{p.nonzero:,}",
        f"{100 * p.sparsity:.1f}",
        _kb(p.dense_bytes),
        _kb(p.csr_bytes),
        _kb(p.nm_bytes),
        _si(p.macs),
        _si(p.effective_macs),
    )


def _kind(module: nn.Module) -> str:
    # parametrize swaps the class for a "Parametrized<Class>" subclass; show the original.
    cls = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
    return cls.__name__


def _layer_profile(layer: Layer, macs: int) -> LayerProfile:
    weight = layer.module.weight  # the effective (masked) weight
    return _counts(layer.name, _kind(layer.module), to_canonical(layer.module, weight),
                   getattr(layer.module, "bias", None), macs)  # fmt: skip


def _counts(name: str, kind: str, canonical: Tensor, bias: object, macs: int) -> LayerProfile:
    """The row of a weight in canonical ``(out, in, ...)`` layout and its bias."""
    bias = bias if isinstance(bias, Tensor) else canonical.new_empty(0)
    numel, nnz, elem = (
        canonical.numel(),
        int(torch.count_nonzero(canonical)),
        canonical.element_size(),
    )
    bias_bytes = bias.numel() * bias.element_size()
    divisible = canonical.shape[1] % 4 == 0
    return LayerProfile(
        name=name,
        kind=kind,
        params=numel + bias.numel(),
        nonzero=nnz + int(torch.count_nonzero(bias)),
        weight_params=numel,
        weight_nonzero=nnz,
        dense_bytes=numel * elem + bias_bytes,
        csr_bytes=csr_bytes(nnz, canonical.shape[0], elem) + bias_bytes,
        nm_bytes=nm_bytes(numel, elem) + bias_bytes if divisible else None,
        macs=macs,
        effective_macs=macs * nnz / max(numel, 1),
    )


def _converted(model: nn.Module, macs: dict[nn.Module, int]) -> list[tuple[int, LayerProfile]]:
    """Rows of the layers :func:`prunekit.sparse.convert` replaced (the modules with a
    ``to_dense()`` weight; duck-typed, so the analysis layer needs no format class): the
    counts of their dense equivalent, MACs as the counter saw them."""
    return [
        (id(module), _counts(name, _kind(module), module.to_dense(),
                             getattr(module, "bias", None), macs.get(module, 0)))
        for name, module in model.named_modules()
        if callable(getattr(module, "to_dense", None)) and hasattr(module, "in_features")
    ]  # fmt: skip


def _total(rows: list[tuple[int, LayerProfile]], total_macs: int) -> LayerProfile:
    """Sum of ``rows`` (keyed by their weight), each shared weight once; MACs are the whole
    model's ``total_macs``."""
    firsts = dict(rows)
    unique = list(firsts.values())
    nm = [row.nm_bytes for row in unique]
    return LayerProfile(
        name="total",
        kind="",
        params=sum(row.params for row in unique),
        nonzero=sum(row.nonzero for row in unique),
        weight_params=sum(row.weight_params for row in unique),
        weight_nonzero=sum(row.weight_nonzero for row in unique),
        dense_bytes=sum(row.dense_bytes for row in unique),
        csr_bytes=sum(row.csr_bytes for row in unique),
        nm_bytes=None if None in nm else sum(nm),
        macs=total_macs,
        effective_macs=total_macs - sum(row.macs * row.sparsity for _, row in rows),
    )


def _chosen(model: nn.Module, layers: Selector) -> list[Layer]:
    """The prunable layers selected; none is fine when converted layers remain to count."""
    try:
        return select_layers(model, layers)
    except NoLayersError:
        if layers is not None or not _converted(model, {}):
            raise
        return []


def _counted(model: nn.Module, example_inputs: Inputs) -> tuple[dict[nn.Module, int], int]:
    """:func:`~prunekit.cost.macs_per_module`; the model's own failure on the inputs is an
    :class:`~prunekit.errors.InvalidInputsError` naming both."""
    try:
        return macs_per_module(model, example_inputs)
    except PruningError:
        raise
    except Exception as err:  # the model's own forward on the user's inputs
        raise InvalidInputsError(
            f"{type(model).__name__} does not run on example_inputs {example_inputs!r:.80} "
            f"of type {type(example_inputs).__name__} ({type(err).__name__}: "
            f"{first_line(err)}); Fix: pass inputs its forward takes: "
            "a tensor, a tuple of positional arguments or a dict of keyword arguments."
        ) from err


def profile(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    latency: bool = True,
    min_run_time: float = 0.2,
    layers: Selector = None,
) -> Profile:
    """Count params, nonzeros, bytes and MACs of the prunable ``layers`` of ``model`` (all by
    default, layers :func:`prunekit.sparse.convert` replaced included, counted from their
    dense equivalent) and time the whole model (see the module docstring for every formula).

    The model runs in eval mode on ``example_inputs`` (see :mod:`prunekit.inputs`); its
    training flags are restored and no hook is left. ``latency=False`` skips timing
    (``latency_s`` is None).

    Raises:
        NoLayersError: when ``layers`` matches nothing prunable.
        InvalidInputsError: the model does not run on ``example_inputs``.
        InvalidWeightError: a tensor of the model is on the meta device.
    """
    require_model(model, real=True)
    checked("profile", "min_run_time", min_run_time, MIN_RUN_TIME)
    chosen = _chosen(model, layers)
    with eval_mode(model):
        per_module, total_macs = _counted(model, example_inputs)
        latency_s = measure_latency(model, example_inputs, min_run_time) if latency else None
        with torch.no_grad():
            keyed = [(id(weight_param(ly.module)), _layer_profile(ly, per_module.get(ly.module, 0)))
                     for ly in chosen]  # fmt: skip
            if layers is None:
                keyed += _converted(model, per_module)
    rows = [row for _, row in keyed]
    return Profile(rows, _total(keyed, total_macs), latency_s)


_RATIO_KEYS = ("params", "nonzero", "dense_bytes", "csr_bytes", "macs", "effective_macs")


def _ratio(after: float | None, before: float | None) -> float | None:
    return None if after is None or not before else after / before


def compare(before: Profile, after: Profile) -> dict[str, float | None]:
    """Ratios ``after / before`` of the totals (params, nonzero, dense_bytes, csr_bytes, macs,
    effective_macs) and of ``latency_s``; None where a value is missing or ``before`` is 0."""
    ratios = {
        key: _ratio(getattr(after.total, key), getattr(before.total, key)) for key in _RATIO_KEYS
    }
    ratios["latency_s"] = _ratio(after.latency_s, before.latency_s)
    return ratios
