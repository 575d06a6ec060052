"""Building the latency cost model of a real model for
:func:`~prunekit.structured.latency.latency_plan`: which layers each family shrinks (from
the dependency graph), their measured curves, the rest of the model's time, each family's
learned ``round_to`` and the importance the allocator weighs (see
:mod:`~prunekit.structured.latency_model` for the formulas)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from prunekit.cost import macs_per_module
from prunekit.inputs import Inputs
from prunekit.structured.fold import fold_batchnorm
from prunekit.structured.graph import DependencyGraph, owner
from prunekit.structured.latency_alloc import Family
from prunekit.structured.latency_check import TURNS, turn_ratio
from prunekit.structured.latency_measure import (
    TIMED,
    LatencyMeter,
    LayerSpec,
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
    floor_share,
    grid,
    learn_step,
    probe_base,
    probe_widths,
)

STEP_SHARE = 0.25
"""A family's ``round_to`` is learned on its layers taking at least this share of the
time of its slowest one."""


def orders_of(graph: DependencyGraph, scores: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
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


def model_cost(
    model: nn.Module, inputs: Inputs, size: int, graph: DependencyGraph,
    orders: Mapping[str, Tensor], meter: LatencyMeter, fold_bn: bool,
) -> tuple[ModelCost, dict[str, LayerSpec]]:  # fmt: skip
    """The fitted :class:`ModelCost` at batch ``size`` and the timed layers' specs."""
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
        floor = floor_share(list(fitted.values()))
        macs = per_module.get(modules[name], 0)
        layers.append(LayerCost(name, full, macs, fitted, floor=floor))
    timed = sum(layer.seconds for layer in layers)
    rest = _rest(meter, as_deployed(model, big, fold_bn), big, list(specs.values()), timed)
    rest_macs = total_macs - sum(layer.macs for layer in layers)
    return ModelCost(_shared(layers, specs, rest), 0.0 if layers else rest, rest_macs), specs


def _rest(
    meter: LatencyMeter, deployed: nn.Module, inputs: Inputs, specs: list[LayerSpec],
    timed: float,
) -> float:  # fmt: skip
    """The seconds the model spends outside its timed layers, on the scale of their
    curves (which sum to ``timed``): ``rest = timed x (whole / layers - 1)``, the ratio
    of the whole model to its layers at full width timed now in interleaved turns
    (:func:`~prunekit.structured.latency_check.turn_ratio`). Timed minutes apart, a CPU
    whose speed drifts 1.7x made the rest anything from 0 to 10 times the layers."""
    ratio = turn_ratio(lambda: meter.model(deployed, inputs), lambda: meter.now(specs))
    if ratio is None:  # a meter that does not time layers now
        return max(0.0, min(meter.model(deployed, inputs) for _ in range(TURNS)) - timed)
    return max(0.0, ratio - 1.0) * timed


def as_deployed(model: nn.Module, inputs: Inputs, fold_bn: bool) -> nn.Module:
    """``model``, or with ``fold_bn`` an eval-mode copy with its BatchNorms folded."""
    if not fold_bn:
        return model
    folded = copy.deepcopy(model).eval()
    fold_batchnorm(folded, inputs)
    return folded


def _shared(layers: list[LayerCost], specs: Mapping[str, LayerSpec], rest: float) -> tuple:
    """``layers`` with ``rest`` seconds shared in proportion to their output elements
    (``macs / (in / groups x kernel)``; :mod:`~prunekit.structured.latency_model`)."""
    outputs = [
        layer.macs / max(1, specs[layer.name].in_ch // specs[layer.name].groups)
        / math.prod(specs[layer.name].kernel or (1,))
        for layer in layers
    ]  # fmt: skip
    total = sum(outputs) or 1.0
    pairs = zip(layers, outputs, strict=True)
    return tuple(dataclasses.replace(x, follow=rest * n / total) for x, n in pairs)


def learned_steps(
    cost: ModelCost, specs: Mapping[str, LayerSpec], graph: DependencyGraph, meter: LatencyMeter
) -> dict[str, int]:
    """Each family's ``round_to`` in groups: the largest step learned on the axes of its
    layers that take at least :data:`STEP_SHARE` of its slowest layer's time. (The
    slowest layer alone missed a depthwise convolution's block: a MobileNetV2 hidden
    family cut to widths its 1x1 convolutions liked, where its depthwise convolutions ran
    no faster than at full width.)"""
    out = {}
    layers = cost.of_family()
    for fam in graph.families:
        candidates = [
            (layer.seconds, layer.name, axis_name, axis)
            for layer in layers.get(fam.name, [])
            for axis_name, axis in layer.axes.items()
            if probe_base(axis.size) and any(f == fam.name for f, _ in axis.families)
        ]
        slowest = max((c[0] for c in candidates), default=0.0)
        steps = [_step(fam.name, specs[name], axis_name, axis, meter)
                 for seconds, name, axis_name, axis in candidates
                 if seconds >= STEP_SHARE * slowest]  # fmt: skip
        out[fam.name] = max(steps, default=1)
    return out


def _step(family: str, spec: LayerSpec, axis_name: str, axis: Axis, meter: LatencyMeter) -> int:
    """The step :func:`learn_step` measures on one layer's axis, in groups of ``family``."""
    w0 = probe_base(axis.size)
    assert w0 is not None
    channels = learn_step(meter.layer(spec, axis_name, probe_widths(w0)), w0)
    per_group = next(c[-1] / (len(c) - 1) for f, c in axis.families if f == family)
    return max(1, round(channels / per_group))


def allocator_families(
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
