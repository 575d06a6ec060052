"""Latency-aware shrinking: cost-model fitting, the allocator on a fake latency table, the
plan's ratios in pk.shrink, the disk cache and bad inputs (no timing assertions)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import assert_unchanged, snapshot
from structured_models import randomize_norms
from torch import nn

import prunekit as pk
from prunekit.errors import PruningError
from prunekit.structured import latency_measure as lm
from prunekit.structured.latency import LatencyTargetError, latency_plan, shrink_to_latency
from prunekit.structured.latency_model import (
    Axis,
    Curve,
    LayerCost,
    isotonic,
    learn_step,
    probe_widths,
    ratio_for,
)

STEP = 8


def _pad(c: int) -> int:
    return -(-c // STEP) * STEP


class TableMeter:
    """A fake device: a layer costs ``pad(in) / groups * pad(out) * pixels`` ns, on
    kernels that work in blocks of 8 channels (separable, so the model is exact)."""

    def __init__(self) -> None:
        self.calls = 0

    @staticmethod
    def seconds(spec: lm.LayerSpec, axis: str, w: int) -> float:
        cin = w if axis in ("in", "both") else spec.in_ch
        cout = w if axis in ("out", "both") else spec.out_ch
        groups = w if axis == "both" else spec.groups
        rows = math.prod(spec.input_shape[:-1] if spec.kind == "Linear" else spec.input_shape[2:])
        return 1e-9 * _pad(cin) / groups * _pad(cout) * rows * math.prod(spec.kernel or (1,))

    def layer(self, spec: lm.LayerSpec, axis: str, widths: list[int]) -> dict[int, float]:
        self.calls += 1
        return {w: self.seconds(spec, axis, w) for w in widths}

    def model(self, model: nn.Module, inputs: object) -> float:
        return 0.0  # the rest of the model costs nothing here


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1, groups=128), nn.ReLU(),
        nn.Conv2d(128, 64, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval())  # fmt: skip


X = torch.randn(1, 3, 8, 8)


def _truth(model: nn.Module) -> float:
    """What the fake device says the shrunk model's timed layers cost, plus its rest."""
    shapes = lm.timed_layers(model, X, [n for n, _ in model.named_modules()])
    modules = dict(model.named_modules())
    total = 0.0
    for name, shape in shapes.items():
        spec = lm.spec_of(modules[name], shape, torch.float32)
        total += TableMeter.seconds(spec, "out", spec.out_ch)
    return total


def test_isotonic_fit_is_monotone_and_interpolates():
    assert isotonic([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    curve = Curve.fit({8: 1.0, 16: 3.0, 24: 2.0, 32: 4.0})
    assert curve.seconds == (1.0, 2.5, 2.5, 4.0)
    assert curve(12) == pytest.approx(1.75)
    assert curve(4) == 1.0 and curve(40) == 4.0


def test_layer_cost_scales_its_curves_and_the_work_on_its_output():
    flat = Curve.fit({8: 1.0, 16: 2.0})
    layer = LayerCost("conv", 2.0, 100, {
        "in": Axis(16, flat, (("a", tuple(range(17))),)),
        "out": Axis(16, flat, (("b", tuple(range(17))),)),
    }, follow=0.5)  # fmt: skip
    kept = {"a": 8, "b": 12}  # in at 8 of 16 (curve 1/2), out at 12 (curve 3/4)
    assert layer.latency(kept) == pytest.approx(2.0 * 0.5 * 0.75 + 0.5 * 12 / 16)
    assert layer.macs_at(kept) == pytest.approx(100 * 8 / 16 * 12 / 16)


@pytest.mark.parametrize("step", [1, 4, 8, 16])
def test_learn_step_finds_the_staircase(step):
    w0 = 64
    points = {w: float(-(-w // step) * step) for w in probe_widths(w0)}
    assert learn_step(points, w0) == step


def test_learn_step_ignores_noise():
    points = {w: 100.0 + 0.5 * (w % 3) for w in probe_widths(64)}
    assert learn_step(points, 64) == 1


def test_ratio_for_is_read_back_exactly_by_shrink():
    for total in range(1, 300):
        for kept in range(1, total + 1):
            r = ratio_for(total, kept)
            assert 0 <= r < 1 and total - math.floor(r * total) == kept


def test_plan_reaches_the_target_on_a_fake_table():
    model = _cnn()
    before = snapshot(model)
    plan = latency_plan(model, X, speedup=2.0, meter=TableMeter())
    assert_unchanged(model, before)  # planning is pure
    assert plan.speedup >= 2.0
    assert set(plan.round_to.values()) == {8}  # learned from the staircase
    for name, kept in plan.kept.items():
        assert kept % 8 == 0 or kept == plan.totals[name]
    shrunk = copy.deepcopy(model)
    pk.shrink(shrunk, X, ratio=plan.ratios)
    assert _truth(shrunk) == pytest.approx(plan.latency_s, rel=1e-9)


def test_shrink_to_latency_applies_the_plan_exactly():
    model = _cnn()
    plan, report = shrink_to_latency(model, X, macs_ratio=0.5, meter=TableMeter())
    assert {f.name: f.kept for f in report.families if f.name in plan.ratios} == {
        n: plan.kept[n] for n in plan.ratios
    }
    assert report.macs_ratio == pytest.approx(plan.macs_ratio, rel=1e-6)
    assert report.macs_ratio <= 0.5
    assert report.deviation is not None and report.deviation < 1e-4


def test_round_to_imposed_and_max_ratio_respected():
    plan = latency_plan(_cnn(), X, speedup=1.5, round_to=16, max_ratio=0.6, meter=TableMeter())
    for name, kept in plan.kept.items():
        assert kept % 16 == 0 and kept >= 0.4 * plan.totals[name]


def test_unreachable_target_leaves_the_model_unchanged():
    model = _cnn()
    before = snapshot(model)
    with pytest.raises(LatencyTargetError, match="out of reach"):
        shrink_to_latency(model, X, speedup=50.0, meter=TableMeter())
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one target"),
        ({"speedup": 2.0, "macs_ratio": 0.5}, "exactly one target"),
        ({"speedup": 0.5}, "speedup"),
        ({"macs_ratio": 1.0}, "macs_ratio"),
        ({"speedup": 2.0, "batch_size": 0}, "batch_size"),
        ({"speedup": 2.0, "round_to": 0}, "round_to"),
        ({"speedup": 2.0, "max_ratio": 1.0}, "max_ratio"),
        ({"speedup": 2.0, "device": "nonsense"}, "device"),
        ({"speedup": 2.0, "criterion": "nope"}, "nope"),
        ({"speedup": 2.0, "fold_bn": "yes"}, "fold_bn"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(kwargs, match):
    model = _cnn()
    before = snapshot(model)
    meter = TableMeter()
    with pytest.raises(PruningError, match=match):
        shrink_to_latency(model, X, meter=meter, **kwargs)
    assert meter.calls == 0
    assert_unchanged(model, before)


def _spec() -> lm.LayerSpec:
    return lm.spec_of(nn.Linear(16, 8), (2, 16), torch.float32)


def test_cache_round_trip(tmp_path, monkeypatch):
    meter = lm.MeasuredLatency(min_run_time=0.001, cache_dir=tmp_path)
    first = meter.layer(_spec(), "out", [4, 8])
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["key"]["axis"] == "out" and data["key"]["threads"] == torch.get_num_threads()

    def no_timing(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(lm, "seconds", no_timing)
    assert meter.layer(_spec(), "out", [8, 4]) == first


def test_cache_lives_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert lm.cache_root() == tmp_path / "prunekit" / "latency"
    assert lm.MeasuredLatency().dir == tmp_path / "prunekit" / "latency"


@pytest.mark.parametrize("content", ["{not json", '{"key": {}, "points": [[4, 1e-3]]}',
                                     None])  # fmt: skip
def test_corrupt_cache_is_refused(tmp_path, content):
    meter = lm.MeasuredLatency(min_run_time=0.001, cache_dir=tmp_path)
    key = meter.key(_spec(), "out")
    path = meter.path(key)
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:  # the right key, a negative timing
        content = json.dumps({"key": key, "points": [[4, -1.0]]})
    path.write_text(content)
    with pytest.raises(lm.LatencyCacheError, match=r"corrupt.*delete it"):
        meter.layer(_spec(), "out", [4])


def test_inputs_are_grown_to_the_timed_batch_size():
    x, ids = torch.randn(2, 3), torch.tensor([[1, 2], [3, 4]])
    assert lm.batched(x, 5).shape == (5, 3)
    grown = lm.batched({"input_ids": ids, "flag": True}, 3)
    assert grown["input_ids"].tolist() == [[1, 2], [3, 4], [1, 2]] and grown["flag"] is True
    assert [t.shape[0] for t in lm.batched((x, torch.zeros(7)), 4)] == [4, 7]
