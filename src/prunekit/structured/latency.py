"""Latency targets for :func:`prunekit.shrink`: per-family ratios chosen from measured latency.

    plan = pk.structured.latency_plan(model, x, speedup=2.0, batch_size=32)
    plan.ratios        # {family: ratio}: what pk.shrink(model, x, ratio=plan.ratios) takes
    plan, report = pk.structured.shrink_to_latency(model, x, speedup=2.0, batch_size=32)

A uniform ratio removes the same share of every family, but MACs are not latency: narrow
or depthwise layers, BatchNorm and activations do not get faster in proportion, and a
width that is not a multiple of the kernel's channel block runs as slowly as the next
multiple. The plan instead

1. times every conv / linear layer a family shrinks, alone, at its real input shape and
   a few widths on the target device (:mod:`~prunekit.structured.latency_measure`,
   cached on disk), and fits a monotone piecewise-linear curve per layer and axis
   (:mod:`~prunekit.structured.latency_model`);
2. learns each family's ``round_to``: the channel block below which the measured latency
   does not drop (:func:`~prunekit.structured.latency_model.learn_step`);
3. removes blocks of groups greedily by importance lost per latency saved
   (:mod:`~prunekit.structured.latency_alloc`), with the scores ``pk.shrink`` uses
   (:func:`~prunekit.structured.importance.score`; each family's divided by their mean
   unless the criterion's are comparable, as for ``scope="global"``), until the predicted
   latency reaches ``dense / speedup`` or, with ``macs_ratio``, the predicted MACs reach
   ``macs_ratio x dense``.

Planning reads the model and changes nothing; :func:`shrink_to_latency` then calls
``pk.shrink`` with the plan's ratios (exactness check included), which removes exactly
the planned number of groups of each family, the least important ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.table import Table
from torch import Tensor, nn

from prunekit.cost import macs_per_module
from prunekit.errors import PruningError
from prunekit.inputs import Inputs, LossFn
from prunekit.inputs import batch_size as batch_size_of
from prunekit.layers import require_model
from prunekit.spec import between, checked, integer
from prunekit.structured.graph import DependencyGraph, Ignore, owner
from prunekit.structured.importance import StructuredCriterion, score
from prunekit.structured.latency_alloc import Allocation, Family, allocate
from prunekit.structured.latency_measure import (
    TIMED,
    LatencyMeter,
    LayerSpec,
    MeasuredLatency,
    batched,
    spec_of,
    timed_layers,
)
from prunekit.structured.latency_model import (
    Axis,
    Curve,
    LayerCost,
    ModelCost,
    cumulative,
    grid,
    learn_step,
    probe_base,
    probe_widths,
    ratio_for,
)
from prunekit.structured.shrink import ShrinkReport, _graph, _normalize, shrink
from prunekit.tables import TableReport

SPEEDUP = between(1.0, 100.0, open_low=True)
MACS_RATIO = between(0.0, 1.0, open_low=True, open_high=True)
MAX_RATIO = between(0.0, 1.0, open_low=True, open_high=True)
BATCH = integer(1, 1 << 20)
ROUND_TO = integer(1, 1 << 16)


class LatencyTargetError(PruningError):
    """The latency or MACs target is out of reach of the model's removable channels."""


@dataclass
class LatencyPlan(TableReport):
    """Per-family ratios for ``pk.shrink`` and what the cost model predicts for them.

    ``ratios`` holds the families the plan shrinks (the others stay whole); ``kept`` /
    ``totals`` their groups after / before; ``round_to`` the block each family's kept
    count is a multiple of (unless it stays whole); latencies are seconds per call at
    ``batch_size`` on ``device`` (predicted; measure the result with
    ``pk.analysis.speedup``)."""

    ratios: dict[str, float]
    kept: dict[str, int]
    totals: dict[str, int]
    round_to: dict[str, int]
    dense_latency_s: float
    latency_s: float
    macs_ratio: float
    batch_size: int
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.dense_latency_s / max(self.latency_s, 1e-30)

    def table(self) -> Table:
        table = Table(
            title="prunekit latency plan",
            caption=f"predicted {self.dense_latency_s * 1e3:.3f} -> {self.latency_s * 1e3:.3f} "
            f"ms ({self.speedup:.2f}x) at batch {self.batch_size} on {self.device}, MACs x "
            f"{self.macs_ratio:.2f}" + "".join(f"\n{n}" for n in self.notes),
        )
        for col in ("family", "kept / total", "ratio", "round_to"):
            table.add_column(col, justify="left" if col == "family" else "right")
        for name, total in self.totals.items():
            kept, ratio = self.kept[name], self.ratios.get(name, 0.0)
            table.add_row(name, f"{kept} / {total}", f"{ratio:.3f}", str(self.round_to[name]))
        return table


class LatencyShrink(NamedTuple):
    plan: LatencyPlan
    report: ShrinkReport


def _target(speedup: float | None, macs_ratio: float | None) -> tuple[str, float]:
    if (speedup is None) == (macs_ratio is None):
        raise PruningError(
            f"speedup={speedup!r}, macs_ratio={macs_ratio!r}: give exactly one target; Fix: "
            "e.g. speedup=2.0 (half the latency) or macs_ratio=0.5 (half the MACs, at the "
            "best latency)."
        )
    if speedup is not None:
        return "speedup", checked("latency_plan", "speedup", speedup, SPEEDUP)
    return "macs_ratio", checked("latency_plan", "macs_ratio", macs_ratio, MACS_RATIO)


def _orders(graph: DependencyGraph, scores: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
    """Each family's groups, least important first (as ``pk.shrink`` removes them)."""
    out = {}
    for fam in graph.families:
        s = scores.get(fam.name)
        out[fam.name] = torch.arange(len(fam)) if s is None else torch.argsort(s, stable=True)
    return out


def _axes(model: nn.Module, graph: DependencyGraph, orders: Mapping[str, Tensor]) -> dict:
    """``{layer: {axis: [(family, cumulative positions)]}}`` of the timed layers."""
    modules = dict(model.named_modules())
    out: dict[str, dict[str, list[tuple[str, tuple[int, ...]]]]] = {}
    for fam in graph.families:
        for runs in fam.runs:
            name = owner(runs.name)
            module = modules.get(name)
            if not isinstance(module, TIMED) or runs.name != f"{name}.weight" or runs.dim > 1:
                continue
            axis = "out" if runs.dim == 0 else "in"
            if getattr(module, "groups", 1) > 1:
                depthwise = module.groups == module.in_channels == module.out_channels
                if not depthwise:
                    continue
                axis = "both"
            cum = cumulative(runs.counts[orders[fam.name]].tolist())
            out.setdefault(name, {}).setdefault(axis, []).append((fam.name, cum))
    return out


def _cost(
    model: nn.Module, inputs: Inputs, size: int, graph: DependencyGraph,
    orders: Mapping[str, Tensor], meter: LatencyMeter,
) -> tuple[ModelCost, dict[str, LayerSpec], dict[str, dict[str, list]]]:  # fmt: skip
    """The fitted :class:`ModelCost` at batch ``size``, the layers' specs and axes."""
    axes = _axes(model, graph, orders)
    big = batched(inputs, size)
    shapes = timed_layers(model, big, axes)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    modules = dict(model.named_modules())
    specs = {n: spec_of(modules[n], shapes[n], dtype) for n in axes if n in shapes}
    per_module, total_macs = macs_per_module(model, inputs)
    layers = []
    for name, spec in specs.items():
        fitted = {}
        for axis, fams in axes[name].items():
            size_a = spec.out_ch if axis != "in" else spec.in_ch
            curve = Curve.fit(meter.layer(spec, axis, grid(size_a)))
            fitted[axis] = Axis(size_a, curve, tuple(fams))
        full = next(iter(fitted.values())).curve(next(iter(fitted.values())).size)
        layers.append(LayerCost(name, full, per_module.get(modules[name], 0), fitted))
    timed = sum(layer.seconds for layer in layers)
    rest = max(0.0, meter.model(model, big) - timed)
    rest_macs = total_macs - sum(layer.macs for layer in layers)
    return ModelCost(tuple(layers), rest, rest_macs), specs, axes


def _steps(
    cost: ModelCost, specs: Mapping[str, LayerSpec], graph: DependencyGraph, meter: LatencyMeter
) -> dict[str, int]:
    """Each family's ``round_to`` in groups, learned on its slowest layer's axis."""
    out = {}
    layers = cost.of_family()
    for fam in graph.families:
        candidates = [
            (layer.seconds, layer.name, axis_name, axis)
            for layer in layers.get(fam.name, [])
            for axis_name, axis in layer.axes.items()
            if probe_base(axis.size) and any(f == fam.name for f, _ in axis.families)
        ]
        if not candidates:
            out[fam.name] = 1
            continue
        _, name, axis_name, axis = max(candidates, key=lambda c: c[0])
        w0 = probe_base(axis.size)
        assert w0 is not None
        channels = learn_step(meter.layer(specs[name], axis_name, probe_widths(w0)), w0)
        per_group = next(c[-1] / (len(c) - 1) for f, c in axis.families if f == fam.name)
        out[fam.name] = max(1, round(channels / per_group))
    return out


def _families(
    graph: DependencyGraph, scores: Mapping[str, Tensor | None], steps: Mapping[str, int],
    normalize: str,
) -> dict[str, Family]:  # fmt: skip
    out = {}
    for fam in graph.families:
        s = scores.get(fam.name)
        if s is None:
            continue
        norm = s if normalize == "none" else s / s.mean().clamp_min(1e-30)
        lost = (0.0, *torch.sort(norm).values.double().cumsum(0).tolist())
        out[fam.name] = Family(len(fam), min(steps[fam.name], len(fam)), lost)
    return out


def _checked_args(
    model: nn.Module, speedup: float | None, macs_ratio: float | None, batch_size: int | None,
    round_to: int | None, max_ratio: float, criterion: StructuredCriterion, normalize: str,
) -> tuple[str, float, str]:  # fmt: skip
    """Every argument checked before anything runs: ``(target kind, value, normalize)``."""
    require_model(model, real=True)
    kind, value = _target(speedup, macs_ratio)
    if batch_size is not None:
        checked("latency_plan", "batch_size", batch_size, BATCH)
    if round_to is not None:
        checked("latency_plan", "round_to", round_to, ROUND_TO)
    checked("latency_plan", "max_ratio", max_ratio, MAX_RATIO)
    return kind, value, _normalize(normalize, criterion)


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    own = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device is None:
        return own
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PruningError(f"device={device!r} is not a torch device ({exc}); Fix: e.g. "
                           "device='cpu' or 'cuda'.") from None  # fmt: skip
    if wanted.type != own.type:
        raise PruningError(
            f"device={device!r} but the model lives on {own}; Fix: move the model and the "
            "example inputs to the target device first (model.to(device))."
        )
    return wanted


def _result(
    alloc: Allocation, families: Mapping[str, Family], cost: ModelCost, size: int,
    device: torch.device, meter: LatencyMeter,
) -> LatencyPlan:  # fmt: skip
    whole = {name: f.total for name, f in families.items()}
    ratios = {n: ratio_for(f.total, alloc.kept[n]) for n, f in families.items()
              if alloc.kept[n] < f.total}  # fmt: skip
    notes = [
        f"{len(cost.layers)} layers timed in isolation ({type(meter).__name__}); the rest "
        f"of the model ({cost.rest_seconds * 1e3:.3f} ms) is held constant"
    ]
    return LatencyPlan(
        ratios, dict(alloc.kept), {n: f.total for n, f in families.items()},
        {n: f.step for n, f in families.items()}, cost.latency(whole), alloc.latency,
        alloc.macs / max(cost.macs(whole), 1.0), size, str(device), notes,
    )  # fmt: skip


def latency_plan(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    speedup: float | None = None,
    macs_ratio: float | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    criterion: StructuredCriterion = "l2",
    normalize: str = "auto",
    round_to: int | None = None,
    max_ratio: float = 0.8,
    ignore: Ignore = (),
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    meter: LatencyMeter | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> LatencyPlan:
    """Per-family ratios that reach ``speedup`` (predicted dense latency / shrunk latency)
    or ``macs_ratio`` (MACs kept, at the best predicted latency) on ``device`` at
    ``batch_size`` (default: the example inputs'; their first dimension is the batch).
    See the module docstring. Changes nothing: pass ``plan.ratios`` to ``pk.shrink``
    with the same ``criterion``, or call :func:`shrink_to_latency`.

    ``round_to=None`` learns each family's block from the measurements; an int imposes
    it on every family. No family loses more than ``max_ratio`` of its groups. ``meter``
    replaces the timing (default :class:`~prunekit.structured.latency_measure.MeasuredLatency`
    on ``device``, cached under ``cache_dir``; ``cache=False``: no cache).

    Raises:
        LatencyTargetError: the target is out of reach (the best reachable is named).
        PruningError: bad arguments (named with the fix), before anything runs.
        InvalidInputsError, UntraceableError: as ``pk.shrink``.
        LatencyCacheError: a corrupt latency cache file (named).
    """
    kind, value, normalize = _checked_args(
        model, speedup, macs_ratio, batch_size, round_to, max_ratio, criterion, normalize
    )
    where = _device(model, device)
    meter = meter or MeasuredLatency(where, cache=cache, cache_dir=cache_dir)
    graph = _graph(model, example_inputs, ignore)
    scores = score(model, graph, criterion, data=data, loss_fn=loss_fn, seed=seed)
    size = batch_size or batch_size_of(example_inputs)
    cost, specs, _ = _cost(model, example_inputs, size, graph, _orders(graph, scores), meter)
    steps = _steps(cost, specs, graph, meter) if round_to is None else {}
    steps = {f.name: steps.get(f.name, round_to or 1) for f in graph.families}
    families = _families(graph, scores, steps, normalize)
    whole = {name: f.total for name, f in families.items()}
    t0, m0 = cost.latency(whole), cost.macs(whole)
    goal = t0 / value if kind == "speedup" else m0 * value
    index = 0 if kind == "speedup" else 1
    alloc = allocate(cost, families, lambda t, m: (t, m)[index] <= goal, max_ratio)
    if not alloc.reached:
        best = t0 / alloc.latency if kind == "speedup" else alloc.macs / m0
        raise LatencyTargetError(
            f"{kind}={value:g} is out of reach of {type(model).__name__}'s removable "
            f"channels with max_ratio={max_ratio:g}: the plan reaches {kind} {best:.3g} "
            f"(layers outside the families take {cost.rest_seconds * 1e3:.3f} ms of "
            f"{t0 * 1e3:.3f} ms). Fix: ask for less, or raise max_ratio."
        )
    return _result(alloc, families, cost, size, where, meter)


def shrink_to_latency(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    criterion: StructuredCriterion = "l2",
    ignore: Ignore = (),
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    verify: bool = True,
    **plan_kwargs: Any,
) -> LatencyShrink:
    """:func:`latency_plan`, then ``pk.shrink(model, example_inputs, ratio=plan.ratios)``
    with the same criterion (the only step that changes the model). ``plan_kwargs`` are
    :func:`latency_plan`'s target and timing arguments (``speedup=2.0``...)."""
    shared = {"criterion": criterion, "ignore": ignore, "data": data, "loss_fn": loss_fn,
              "seed": seed}  # fmt: skip
    plan = latency_plan(model, example_inputs, **shared, **plan_kwargs)
    if not plan.ratios:
        raise LatencyTargetError("the plan removes nothing; Fix: ask for a larger target.")
    report = shrink(model, example_inputs, plan.ratios, verify=verify, **shared)
    return LatencyShrink(plan, report)


__all__ = [
    "LatencyPlan",
    "LatencyShrink",
    "LatencyTargetError",
    "latency_plan",
    "shrink_to_latency",
]
