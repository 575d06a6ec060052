"""Figures: every plot writes a PNG that decodes at the figure's size and is not blank, and
an SVG; the granularity figure's masks come from prunekit's own pruning."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import assert_unchanged, snapshot
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.figure import Figure
from torch import nn

import prunekit as pk
from prunekit.analysis import SensitivityReport, plots
from prunekit.analysis.sensitivity import LayerSensitivity
from prunekit.granularity import parse
from prunekit.layers import weight_param


def _check_png(fig: Figure, path: Path) -> None:
    image = matplotlib.image.imread(path)
    width, height = (fig.get_size_inches() * fig.dpi).round().astype(int)
    assert image.shape[:2] == (height, width)
    assert float(np.var(image[..., :3])) > 0


def _check_svg(path: Path) -> None:
    text = path.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and text.rstrip().endswith("</svg>")


def _report() -> SensitivityReport:
    layers = [
        LayerSensitivity("fc1", "Linear", 1000, (0.9, 0.88, 0.7)),
        LayerSensitivity("fc2", "Linear", 100, (0.85, 0.6, 0.3)),
    ]
    return SensitivityReport("element", "magnitude", 0.9, (0.3, 0.6, 0.9), layers)


def _masked_convnet(convnet: nn.Module) -> nn.Module:
    pk.prune(convnet, 0.5, granularity="kernel", layers=["conv"])
    pk.prune(convnet, 0.7, layers=["head"], include_output=True)
    return convnet


def _all_figures(convnet: nn.Module) -> dict[str, callable]:
    model = _masked_convnet(convnet)
    return {
        "granularity": lambda p: plots.plot_granularity_masks(model.conv, p),
        "conv3d": lambda p: plots.plot_conv_mask_3d(model.conv, p),
        "histogram": lambda p: plots.plot_weight_histogram(weight_param(model.head), model.head, p),
        "density": lambda p: plots.plot_layer_density(model, p),
        "sensitivity": lambda p: plots.plot_sensitivity(_report(), p, budget=0.05),
        "accuracy": lambda p: plots.plot_accuracy_vs_sparsity(
            {"magnitude": {0.5: [0.9, 0.92], 0.9: [0.7, 0.8]}, "random": {0.5: [0.6], 0.9: [0.2]}},
            p,
        ),
        "latency": lambda p: plots.plot_latency_vs_macs(
            {"filter": [(2e6, 1.1), (1e6, 0.6)], "element": [(2e6, 1.1), (2e6, 1.2)]}, p
        ),
    }


def test_every_plot_writes_png_and_svg(convnet: nn.Module, tmp_path: Path) -> None:
    for name, draw in _all_figures(convnet).items():
        png, svg = tmp_path / f"{name}.png", tmp_path / f"{name}.svg"
        fig = draw(png)
        assert isinstance(fig, Figure)
        _check_png(fig, png)
        draw(svg)
        _check_svg(svg)


def test_granularity_masks_have_exact_kept_fractions() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3)  # every group count is even: 50% is exact everywhere
    before = snapshot(conv)
    masks = plots.granularity_masks(conv)
    assert_unchanged(conv, before)
    assert list(masks) == list(plots.GRANULARITY_PANELS)
    for name, mask in masks.items():
        assert mask.shape == conv.weight.shape and mask.dtype == torch.bool
        assert mask.float().mean().item() == 0.5, name
    # The structure is the granularity's: each group all kept or all pruned.
    for name in ("row", "column", "kernel", "filter", "channel", "block:4x4"):
        grouping = parse(name).grouping(tuple(conv.weight.shape))
        groups = grouping.groups(masks[name])
        assert bool((groups.all(-1) | ~groups.any(-1)).all()), name
    nm = masks["2:4"].movedim(1, -1).reshape(-1, 4)
    assert bool((nm.sum(-1) == 2).all())
    # Magnitude: the element mask keeps exactly the larger half.
    w = conv.weight.detach().abs()
    assert w[masks["element"]].min() >= w[~masks["element"]].max()


def test_granularity_figure_from_tensor_and_inapplicable_panels(tmp_path: Path) -> None:
    weight = torch.randn(12, 10)
    masks = plots.granularity_masks(weight)
    assert isinstance(masks["kernel"], str) and "no kernel" in masks["kernel"]
    assert isinstance(masks["2:4"], str) and isinstance(masks["block:4x4"], str)
    assert masks["row"].float().mean().item() == 0.5
    fig = plots.plot_granularity_masks(weight, tmp_path / "linear.png")
    _check_png(fig, tmp_path / "linear.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert "kernel: n/a" in titles and "element: 50% kept" in titles


def test_bad_inputs() -> None:
    with pytest.raises(pk.PruningError, match="convolution"):
        plots.plot_conv_mask_3d(nn.Linear(4, 4))
    with pytest.raises(pk.PruningError, match="not a prunable layer"):
        plots.granularity_masks(nn.ReLU())
    with pytest.raises(pk.PruningError, match="empty"):
        plots.plot_accuracy_vs_sparsity({})
    with pytest.raises(pk.PruningError, match="empty"):
        plots.plot_latency_vs_macs({"a": []})


def test_one_figure_draws_each_granularity_on_the_first_layer_that_takes_it() -> None:
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(6, 8, 3), nn.Linear(16, 8)  # 4 divides 16 inputs, not 6
    fig = plots.plot_granularity_masks({"conv": conv, "fc": linear})
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:2] == ["dense |W| (conv)", "dense |W| (fc)"]
    assert "2:4 (fc): 50% kept" in titles and "block:4x4 (fc): 50% kept" in titles
    for gran in ("element", "row", "column", "kernel", "filter", "channel"):
        assert f"{gran} (conv): 50% kept" in titles, gran
    assert "Granularities at 50% sparsity by magnitude: conv (8, 6, 3, 3), fc (8, 16)" in (
        fig._suptitle.get_text()
    )
    only_linear = plots.plot_granularity_masks({"fc": linear}, granularities=["kernel"])
    assert [ax.get_title() for ax in only_linear.axes[:2]] == ["dense |W|", "kernel: n/a"]
    with pytest.raises(pk.PruningError, match="no layers"):
        plots.plot_granularity_masks({})


@given(st.lists(st.booleans(), max_size=40))
def test_runs_cover_exactly_the_true_entries(flags: list[bool]) -> None:
    runs = plots._runs(np.array(flags, dtype=bool))
    rebuilt = np.zeros(len(flags), dtype=bool)
    for start, stop in runs:
        assert start < stop and not rebuilt[start:stop].any()
        rebuilt[start:stop] = True
    assert rebuilt.tolist() == flags
    assert all(a[1] < b[0] for a, b in itertools.pairwise(runs))  # separated runs


def _faces(fig: Figure) -> int:
    """Polygons of the one 3-D collection of a figure, once drawn (projected)."""
    fig.canvas.draw()
    (boxes,) = fig.axes[0].collections
    return len(boxes.get_paths())


def test_conv_mask_3d_draws_one_box_per_run_of_kept_positions() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 2)  # 4 kernel positions per (filter, input channel)
    pk.prune(conv, 0.5, granularity="kernel")
    assert _faces(plots.plot_conv_mask_3d(conv)) == 6 * 6  # 6 of 12 kernels kept, full bars
    mask = torch.tensor([1, 0, 1, 1], dtype=torch.bool).repeat(4, 3, 1).view(4, 3, 2, 2)
    pk.masks.set_mask(conv, mask)
    assert _faces(plots.plot_conv_mask_3d(conv)) == 6 * 2 * 12  # two runs in every kernel


def test_density_and_latency_axes() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    pk.prune(model, 0.5, include_output=True)
    title = plots.plot_layer_density(model, label="local scope").axes[0].get_title()
    assert title == "Per-layer density, local scope\n(total 50.0% of 24 weights)"
    sensitivity = plots.plot_sensitivity(_report(), ylabel="test accuracy")
    assert sensitivity.axes[0].get_ylabel() == "test accuracy"
    fig = plots.plot_latency_vs_macs({"a": [(2e6, 1.0), (1e6, 0.6)]}, xlabel="eff. MACs")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "eff. MACs" and ax.get_ylim()[0] == 0
    assert ax.xaxis.get_major_formatter()(1e6, 0) == "1 M"


def test_latency_points_with_an_error_get_error_bars() -> None:
    fig = plots.plot_latency_vs_macs({"a": [(2e6, 1.0, 0.2), (1e6, 0.6, 0.1)]})
    (bars,) = fig.axes[0].containers
    assert bars.has_yerr
    segments = bars.lines[2][0].get_segments()  # one vertical segment per point, sorted by MACs
    assert [tuple(seg[:, 1].round(6)) for seg in segments] == [(0.5, 0.7), (0.8, 1.2)]
    with pytest.raises(pk.PruningError, match="not \\(macs, latency_ms\\)"):
        plots.plot_latency_vs_macs({"a": [(1e6,)]})  # type: ignore[list-item]
