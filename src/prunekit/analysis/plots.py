"""Figures of what pruning does: masks per granularity, densities, sensitivity, trade-offs.

Every function builds a ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot, no
global state, no display needed), returns it, and when ``path`` is given also saves it
there; the suffix picks the format (``.png``, ``.svg``, or any other matplotlib writes).
A PNG is exactly ``figsize * dpi`` pixels (constrained layout, no tight cropping).
"""

from __future__ import annotations

import copy
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, PercentFormatter
from mpl_toolkits.mplot3d.art3d import Poly3DCollection
from torch import Tensor, nn

from prunekit import granularity as granularity_mod
from prunekit.analysis.sensitivity import SensitivityReport
from prunekit.errors import PruningError
from prunekit.granularity import NM
from prunekit.layers import Layer, is_prunable, kernel_ndim, to_canonical, weight_param
from prunekit.masks import get_mask, remove, sparsity
from prunekit.pruning import prune

PathLike = str | os.PathLike[str] | None
GRANULARITY_PANELS = (
    "element",
    "2:4",
    "row",
    "column",
    "kernel",
    "filter",
    "channel",
    "block:4x4",
)
DPI = 100
_KEPT_CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="white")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path: PathLike) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=fig.dpi)
    return fig


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _gemm(module: nn.Module, t: Tensor) -> np.ndarray:
    """A weight-shaped tensor as the ``(out, in * prod(kernel))`` matrix of its layer."""
    canonical = to_canonical(module, t)
    return _numpy(canonical.reshape(canonical.shape[0], -1))


_MODULE_FOR_NDIM = {2: nn.Linear, 3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


def _dense_layer(layer_or_weight: nn.Module | Tensor) -> nn.Module:
    """A private, unmasked copy of the layer, or a Linear / ConvNd holding the weight
    (storage layout ``(out, in, *kernel)``)."""
    if isinstance(layer_or_weight, nn.Module):
        if not is_prunable(layer_or_weight):
            raise PruningError(
                f"{type(layer_or_weight).__name__} is not a prunable layer; Fix: pass a "
                "Linear / Conv layer of the model (e.g. model.fc1) or its weight tensor."
            )
        # One layer: its original weights, with the caller's masks left in place.
        return remove(copy.deepcopy(layer_or_weight))
    if not isinstance(layer_or_weight, Tensor) or layer_or_weight.dim() not in _MODULE_FOR_NDIM:
        raise PruningError(
            f"expected a layer or a 2-D to 5-D weight tensor, got "
            f"{getattr(layer_or_weight, 'shape', type(layer_or_weight).__name__)}"
        )
    w = layer_or_weight.detach()
    cls = _MODULE_FOR_NDIM[w.dim()]
    args = (w.shape[1], w.shape[0]) if cls is nn.Linear else (w.shape[1], w.shape[0], 1)
    module = cls(*args, bias=False)
    module.weight = nn.Parameter(w.clone().float(), requires_grad=False)
    return module


def granularity_masks(
    layer_or_weight: nn.Module | Tensor,
    sparsity: float = 0.5,
    granularities: Sequence[str] = GRANULARITY_PANELS,
) -> dict[str, Tensor | str]:
    """The mask :func:`prunekit.prune` gives one layer at each granularity (by magnitude).

    Each mask (bool, weight-shaped, True = kept) is computed on a private copy of the dense
    layer, so the layer passed in is untouched. A granularity the layer cannot take maps to
    the reason instead (``kernel`` on a Linear, ``2:4`` when 4 does not divide the inputs).
    N:M masks keep their fixed fraction ``N/M`` whatever ``sparsity`` is.
    """
    base = _dense_layer(layer_or_weight)
    masks: dict[str, Tensor | str] = {}
    for spec in granularities:
        gran = granularity_mod.parse(spec)
        reason = gran.incompatibility(Layer("layer", base))
        if reason is not None:
            masks[gran.name] = reason
            continue
        trial = copy.deepcopy(base)  # one figure panel per granularity, from one base
        prune(trial, None if isinstance(gran, NM) else sparsity, granularity=gran)
        masks[gran.name] = get_mask(trial)
    return masks


Weights = nn.Module | Tensor | Mapping[str, nn.Module | Tensor]


class _Panel(NamedTuple):
    title: str
    layer: nn.Module
    mask: Tensor | str | None  # None: the dense weight; str: why the granularity is n/a


def _panels(
    named: Mapping[str, nn.Module], sparsity: float, granularities: Sequence[str]
) -> list[_Panel]:
    """A dense panel per layer used, then one per granularity on the first layer of
    ``named`` that takes it (the last layer's reason when none does)."""
    masks = {
        name: granularity_masks(layer, sparsity, granularities) for name, layer in named.items()
    }
    chosen = []
    for gran in next(iter(masks.values())):
        name = next((n for n, m in masks.items() if not isinstance(m[gran], str)), list(named)[-1])
        chosen.append((gran, name))
    used = [n for n in named if any(name == n for _, name in chosen)] or list(named)[:1]
    label = (lambda n: f" ({n})") if len(named) > 1 else (lambda n: "")
    dense = [_Panel(f"dense |W|{label(n)}", named[n], None) for n in used]
    return dense + [_Panel(f"{g}{label(n)}", named[n], masks[n][g]) for g, n in chosen]


def plot_granularity_masks(
    layer_or_weight: Weights,
    path: PathLike = None,
    *,
    sparsity: float = 0.5,
    granularities: Sequence[str] = GRANULARITY_PANELS,
) -> Figure:
    """The chapter's granularity figure (Fig. 3-2) drawn from real weights.

    Each weight is drawn as its GEMM matrix ``(out, in * kernel)``: first the dense
    ``|W|``, then one panel per granularity from :func:`granularity_masks`, kept weights
    coloured by ``|w|`` over the 99th percentile of their layer's ``|w|`` (clipped at 1, so
    a few outliers do not darken the rest) and pruned ones white. Given a mapping
    ``{name: layer or weight}`` (e.g. a Linear and a conv of one model), each granularity
    is drawn on the first layer that takes it, so one figure shows all of them.
    """
    items = (
        layer_or_weight.items() if isinstance(layer_or_weight, Mapping) else [("", layer_or_weight)]
    )
    named = {name: _dense_layer(layer) for name, layer in items}
    if not named:
        raise PruningError("no layers given; Fix: pass a layer, a weight or {name: layer}.")
    panels = _panels(named, sparsity, granularities)
    cols = min(4 if len(panels) > 9 else 3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.2 * cols, 3.2 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for ax, (title, layer, mask) in zip(axes, panels, strict=False):
        ax.set_xticks([])
        ax.set_yticks([])
        if isinstance(mask, str):
            ax.set_title(f"{title}: n/a", fontsize=11)
            ax.text(0.5, 0.5, textwrap.fill(mask, 36), ha="center", va="center", fontsize=9)
            continue
        magnitude = np.abs(_gemm(layer, weight_param(layer)))
        magnitude = np.minimum(magnitude / (float(np.percentile(magnitude, 99)) or 1.0), 1.0)
        shown = (
            magnitude if mask is None else np.ma.masked_where(_gemm(layer, mask) == 0, magnitude)
        )
        image = ax.imshow(
            shown, cmap=_KEPT_CMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest"
        )
        kept = "" if mask is None else f": {mask.float().mean().item():.0%} kept"
        ax.set_title(f"{title}{kept}", fontsize=11)
        ax.set_xlabel("inputs x kernel", fontsize=9)
        ax.set_ylabel("outputs", fontsize=9)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    if image is not None:
        label = "|w| / 99th percentile of its layer's |w| (white: pruned)"
        fig.colorbar(image, ax=axes.tolist(), shrink=0.6, label=label)
    shapes = ", ".join(
        f"{name} {tuple(weight_param(layer).shape)}".lstrip() for name, layer in named.items()
    )
    fig.suptitle(f"Granularities at {sparsity:.0%} sparsity by magnitude: {shapes}", fontsize=13)
    return _finish(fig, path)


def _runs(column: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of every run of True in a 1-D bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], column.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _box(x: int, y: int, z0: int, z1: int) -> list[list[tuple[int, int, int]]]:
    """The six faces of the unit-wide box ``[x, x+1] x [y, y+1] x [z0, z1]``."""
    corners = [(x + i, y + j, z) for z in (z0, z1) for j in (0, 1) for i in (0, 1)]
    faces = ((0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5))
    return [[corners[k] for k in face] for face in faces]


def plot_conv_mask_3d(
    conv_layer: nn.Module, path: PathLike = None, max_channels: int = 16
) -> Figure:
    """A 3-D view of a conv layer's mask: output channel x input channel x kernel position
    (kernel dims flattened). Each run of consecutive kept kernel positions is one solid bar,
    so a kept kernel shows as a full-height bar and element pruning as broken ones. At most
    ``max_channels`` output and input channels are drawn. An unmasked layer shows every
    weight kept."""
    if not is_prunable(conv_layer) or kernel_ndim(conv_layer) == 0:
        raise PruningError(
            f"plot_conv_mask_3d needs a convolution layer, got {type(conv_layer).__name__}; "
            "Fix: pass a Conv1d/2d/3d layer, or use plot_granularity_masks for a Linear."
        )
    mask = get_mask(conv_layer)
    if mask is None:
        mask = weight_param(conv_layer).new_ones(weight_param(conv_layer).shape, dtype=bool)
    canonical = to_canonical(conv_layer, mask)
    cube = _numpy(canonical.reshape(*canonical.shape[:2], -1)).astype(bool)
    shown = cube[:max_channels, :max_channels]
    faces = [
        face
        for x, y in np.ndindex(shown.shape[:2])
        for z0, z1 in _runs(shown[x, y])
        for face in _box(x, y, z0, z1)
    ]
    fig = _figure(7, 6)
    ax = fig.add_subplot(projection="3d")
    boxes = Poly3DCollection(
        faces, facecolors="tab:blue", edgecolors="k", linewidths=0.3, shade=True
    )
    boxes.set_alpha(0.85)
    ax.add_collection3d(boxes)
    ax.set(xlim=(0, shown.shape[0]), ylim=(0, shown.shape[1]), zlim=(0, shown.shape[2]))
    ax.set_xlabel("output channel (filter)")
    ax.set_ylabel("input channel")
    ax.set_zlabel("kernel position")
    cropped = f", first {max_channels} channels shown" if shown.shape != cube.shape else ""
    title = f"{Layer('', conv_layer).kind} mask {tuple(canonical.shape)}: {cube.mean():.1%} kept"
    ax.set_title(title + cropped, fontsize=11)
    return _finish(fig, path)


def _values(x: nn.Module | Tensor) -> np.ndarray:
    return _numpy(x.weight if isinstance(x, nn.Module) else x).ravel()


def plot_weight_histogram(
    before: nn.Module | Tensor, after: nn.Module | Tensor, path: PathLike = None, bins: int = 80
) -> Figure:
    """Histograms of a layer's weight values before and after pruning (a layer's effective
    weight, or a tensor). Zeros of ``after`` are counted in the legend, not drawn, so the
    surviving weights stay visible; the y axis is logarithmic."""
    b, a = _values(before), _values(after)
    kept = a[a != 0]
    edges = np.linspace(float(b.min()), float(b.max()), bins + 1)
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    ax.hist(b, bins=edges, alpha=0.55, label=f"before ({b.size:,} weights)", color="tab:gray")
    ax.hist(
        kept,
        bins=edges,
        alpha=0.75,
        label=f"after ({kept.size:,} kept, {a.size - kept.size:,} zeros not drawn)",
        color="tab:blue",
    )
    ax.set_yscale("log")
    ax.set_xlabel("weight value")
    ax.set_ylabel("count (log)")
    ax.set_title("Weight distribution before and after pruning")
    ax.legend()
    return _finish(fig, path)


def plot_layer_density(model: nn.Module, path: PathLike = None, label: str = "") -> Figure:
    """Horizontal bars of each prunable layer's density ``1 - sparsity``
    (from :func:`prunekit.sparsity`), the total density and ``label`` in the title."""
    report = sparsity(model, include_output=True, include_embeddings=True)  # every layer
    names = [r.name for r in report.layers]
    density = [1 - r.sparsity for r in report.layers]
    fig = _figure(7, 1.2 + 0.45 * len(names))
    ax = fig.add_subplot()
    bars = ax.barh(names, density, color="tab:blue")
    ax.bar_label(bars, labels=[f"{d:.1%}" for d in density], padding=3)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("density (fraction of weights kept)")
    what = f"Per-layer density, {label}" if label else "Per-layer density"
    ax.set_title(f"{what}\n(total {1 - report.total:.1%} of {report.numel:,} weights)")
    return _finish(fig, path)


def plot_sensitivity(
    report: SensitivityReport,
    path: PathLike = None,
    budget: float | None = None,
    ylabel: str = "metric",
) -> Figure:
    """One metric-vs-sparsity curve per layer (that layer pruned alone), starting at the
    dense metric; with ``budget``, a dotted line at ``dense - budget``."""
    x = [0.0, *report.sparsities]
    fig = _figure(7.5, 5)
    ax = fig.add_subplot()
    for layer in report.layers:
        label = f"{layer.name} ({layer.numel:,})"
        ax.plot(x, [report.dense, *layer.metrics], marker="o", markersize=4, label=label)
    ax.axhline(report.dense, color="k", linestyle="--", linewidth=1, label="dense")
    if budget is not None:
        ax.axhline(
            report.dense - budget, color="tab:red", linestyle=":", label=f"budget {budget:g}"
        )
    ax.set_xlabel("sparsity of the pruned layer")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title(f"Layer sensitivity ({report.granularity} / {report.criterion})")
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_accuracy_vs_sparsity(
    results: Mapping[str, Mapping[float, Sequence[float]]],
    path: PathLike = None,
    ylabel: str = "accuracy",
) -> Figure:
    """Mean +- std (sample std over seeds; 0 for one seed) of a metric per sparsity, one
    curve with an error band per method. ``results``: ``{method: {sparsity: [values]}}``."""
    if not results or any(not points for points in results.values()):
        raise PruningError(
            "results is empty; Fix: pass {method: {sparsity: [value per seed, ...]}}"
        )
    fig = _figure(7.5, 5)
    ax = fig.add_subplot()
    for method, points in results.items():
        xs = sorted(points)
        values = [np.asarray(points[s], dtype=float) for s in xs]
        mean = np.array([v.mean() for v in values])
        std = np.array([v.std(ddof=1) if v.size > 1 else 0.0 for v in values])
        (line,) = ax.plot(xs, mean, marker="o", markersize=4, label=method)
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("sparsity")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title(f"{ylabel[:1].upper()}{ylabel[1:]} vs sparsity (mean ± std over seeds)")
    ax.legend()
    return _finish(fig, path)


def plot_latency_vs_macs(
    points: Mapping[str, Sequence[tuple[float, ...]]],
    path: PathLike = None,
    xlabel: str = "MACs per forward pass",
) -> Figure:
    """Measured latency against MACs: ``{series: [(macs, latency_ms[, error_ms]), ...]}``,
    one series per name (e.g. per method, one point per operating point). With an error
    (e.g. the std over seeds, :meth:`~prunekit.analysis.SweepReport.latency_vs_macs`) each
    point gets an error bar of +- error; the y axis starts at 0 so that a flat series reads
    as flat."""
    if not points or any(not series for series in points.values()):
        raise PruningError("points is empty; Fix: pass {name: [(macs, latency_ms), ...]}")
    if any(len(p) not in (2, 3) for series in points.values() for p in series):
        raise PruningError(
            "a point is not (macs, latency_ms) or (macs, latency_ms, error_ms); "
            "Fix: pass {name: [(macs, latency_ms, error_ms), ...]}"
        )
    fig = _figure(7.5, 5)
    ax = fig.add_subplot()
    for name, series in points.items():
        rows = sorted(series)
        macs, latency = [p[0] for p in rows], [p[1] for p in rows]
        errors = [p[2] if len(p) == 3 else 0.0 for p in rows]
        ax.errorbar(macs, latency, yerr=errors, marker="o", capsize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("Measured latency vs MACs (error bars: ± error)")
    ax.legend()
    return _finish(fig, path)
