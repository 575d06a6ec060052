"""Sensitivity analysis: per-layer curves on a trained model and the allocation they imply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, snapshot
from torch import nn

import prunekit as pk
from prunekit import zoo
from prunekit.analysis import SensitivityReport, sensitivity
from prunekit.analysis.sensitivity import LayerSensitivity

GRID = (0.0, 0.3, 0.6, 0.9)


class ScaledMLP(nn.Module):
    """64 -> 64 -> 32 -> 10 with a fixed (non-prunable) per-unit scale after fc1's ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 10)
        self.register_buffer("scale", torch.ones(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x)) * self.scale
        return self.fc3(F.relu(self.fc2(x)))


@pytest.fixture(scope="module")
def digits() -> zoo.Dataset:
    return zoo.load_dataset("digits", flat=True)


@pytest.fixture(scope="module")
def trained(digits: zoo.Dataset) -> ScaledMLP:
    torch.manual_seed(0)
    model = ScaledMLP()
    zoo.train(model, digits, epochs=4, lr=3e-3, progress=False)
    return model


def _fresh(trained: ScaledMLP) -> ScaledMLP:
    model = ScaledMLP()
    model.load_state_dict(trained.state_dict())
    return model


def _evaluate(digits: zoo.Dataset):
    return lambda model: zoo.evaluate(model, digits.x_test, digits.y_test)


def test_dense_point_and_model_unchanged(trained: ScaledMLP, digits: zoo.Dataset) -> None:
    trained = _fresh(trained)
    pk.prune(trained, 0.2, layers="fc2")  # a masked layer must survive the analysis as well
    before = snapshot(trained)
    evaluate = _evaluate(digits)
    dense = evaluate(trained)
    report = sensitivity(trained, evaluate, sparsities=GRID, progress=False, include_output=True)
    assert_unchanged(trained, before)
    assert pk.sparsity(trained)["fc1"] == 0.0 and pk.sparsity(trained)["fc2"] == pytest.approx(
        0.2, abs=1e-3
    )
    assert report.dense == dense > 0.8
    assert report.sparsities == GRID
    assert [r.name for r in report.layers] == ["fc1", "fc2", "fc3"]
    for layer in report.layers:
        assert layer.metrics[0] == dense  # sparsity 0 prunes nothing
    assert report.layers[2].metrics[-1] < dense  # fc3 at 90% must hurt
    assert "fc3" in str(report) and "90%" in str(report)
    # the allocation hint passes the flags the analysis used, so fc3 is pruned as measured
    assert (report.include_output, report.include_embeddings) == (True, False)
    model = ScaledMLP()
    alloc = {"fc1": 0.0, "fc2": 0.0, "fc3": 0.5}
    pk.prune(model, allocation=alloc, layers=list(alloc), include_output=report.include_output,
             include_embeddings=report.include_embeddings)  # fmt: skip
    assert pk.sparsity(model, include_output=True)["fc3"] == pytest.approx(0.5, abs=1e-3)
    assert sensitivity(trained, evaluate, sparsities=(0.5,), progress=False).include_output is False


def test_fragile_layer_ranks_last(trained: ScaledMLP, digits: zoo.Dataset) -> None:
    model = _fresh(trained)
    evaluate = _evaluate(digits)
    dense = evaluate(model)
    # Same function, distorted magnitudes: fc1's unit j scaled by c_j (ReLU is positively
    # homogeneous) and the non-prunable buffer undoes it, so magnitude pruning of fc1 now
    # removes whole, perfectly useful units first.
    c = (
        10
        ** torch.linspace(-4, 0, 64)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    )
    with torch.no_grad():
        model.fc1.weight.mul_(c[:, None])
        model.fc1.bias.mul_(c)
        model.scale.copy_(1 / c)
    assert evaluate(model) == pytest.approx(dense, abs=0.01)
    fragile = sensitivity(model, evaluate, progress=False)
    assert fragile.ranking()[-1] == "fc1"
    every = sensitivity(trained, evaluate, progress=False, include_output=True)
    assert every.ranking()[-1] != "fc1"


def test_allocation_meets_target_and_prunes(trained: ScaledMLP, digits: zoo.Dataset) -> None:
    evaluate = _evaluate(digits)
    report = sensitivity(trained, evaluate, progress=False)
    alloc = report.allocation(0.6, budget=0.02)
    sizes = {r.name: r.numel for r in report.layers}
    overall = sum(alloc[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert overall == pytest.approx(0.6, abs=1e-9)
    for name, s in alloc.items():  # within budget at the measured points around s
        drops = dict(zip((0.0, *report.sparsities), (0.0, *report.drops(name)), strict=True))
        assert all(d <= 0.02 for x, d in drops.items() if x <= s + 1e-12)
    model = _fresh(trained)
    result = pk.prune(model, allocation=alloc, layers=list(alloc))
    assert result.sparsity == pytest.approx(0.6, abs=1e-3)
    assert evaluate(model) >= report.dense - 3 * 0.02


def _report(drops: dict[str, tuple[float, ...]], numel: dict[str, int]) -> SensitivityReport:
    layers = [
        LayerSensitivity(n, "Linear", numel[n], tuple(1.0 - d for d in ds))
        for n, ds in drops.items()
    ]
    return SensitivityReport("element", "magnitude", 1.0, (0.25, 0.5, 0.75), layers)


def test_allocation_greedy_order_and_interpolation() -> None:
    report = _report(
        {"tolerant": (0.0, 0.0, 0.005), "fragile": (0.05, 0.2, 0.5)},
        {"tolerant": 300, "fragile": 100},
    )
    assert report.ranking() == ["tolerant", "fragile"]
    # 0.5 overall = 200 of 400 weights: tolerant takes 0.5 (150), then 0.75 would pass 200,
    # so it is interpolated to 200 / 300.
    assert report.allocation(0.5, budget=0.01) == pytest.approx({"tolerant": 2 / 3, "fragile": 0.0})
    assert report.allocation(0.0, budget=0.0) == {"tolerant": 0.0, "fragile": 0.0}
    alloc = report.allocation(0.6, budget=0.06)
    assert alloc["tolerant"] == 0.75 and alloc["fragile"] == pytest.approx(0.15)


def test_impossible_target_names_value_and_fix() -> None:
    report = _report({"a": (0.0, 0.02, 0.3), "b": (0.0, 0.0, 0.1)}, {"a": 100, "b": 100})
    with pytest.raises(pk.PruningError, match=r"target sparsity 70\.00%.*budget 0\.01.*Fix"):
        report.allocation(0.7, budget=0.01)
    with pytest.raises(pk.InvalidSparsityError, match=r"target=1\.5"):
        report.allocation(1.5, budget=0.01)
    with pytest.raises(pk.PruningError, match=r"budget=-0\.1"):
        report.allocation(0.5, budget=-0.1)


def test_bad_input_leaves_model_alone(mlp: nn.Module) -> None:
    before = snapshot(mlp)
    with pytest.raises(pk.InvalidSparsityError):
        sensitivity(mlp, lambda m: 1.0, sparsities=(0.5, 1.0), progress=False)
    with pytest.raises(pk.InvalidSparsityError, match="fixes sparsity"):
        sensitivity(mlp, lambda m: 1.0, granularity="2:4", sparsities=(0.3,), progress=False)
    with pytest.raises(pk.PruningError, match="finite float"):
        sensitivity(mlp, lambda m: float("nan"), progress=False)
    with pytest.raises(pk.NoLayersError):
        sensitivity(mlp, lambda m: 1.0, layers="nothing*", progress=False)
    assert_unchanged(mlp, before)


def test_structured_and_nm_granularities(convnet: nn.Module) -> None:
    x = torch.randn(2, 4, 6, 6)
    reference = convnet(x).detach()

    @torch.no_grad()
    def closeness(model: nn.Module) -> float:
        return -float((model(x) - reference).abs().mean())

    report = sensitivity(
        convnet, closeness, granularity="kernel", sparsities=(0.5,), progress=False,
        include_output=True,
    )
    assert [r.name for r in report.layers] == ["conv", "depthwise", "up"]
    assert report.skipped[0][0] == "head"
    nm = sensitivity(convnet, closeness, granularity="2:4", progress=False, include_output=True)
    assert nm.sparsities == (0.5,)
    assert [r.name for r in nm.layers] == ["conv", "up", "head"]
    assert all(r.metrics[0] < 0 for r in nm.layers)
