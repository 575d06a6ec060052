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
from prunekit.structured.latency_alloc import Allocation, Family, allocate
from prunekit.structured.latency_check import TOLERANCE, TURNS, Checked, corrected, next_goal
from prunekit.structured.latency_model import (
    Axis,
    Curve,
    LayerCost,
    ModelCost,
    floor_share,
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

    def now(self, specs: list[lm.LayerSpec]) -> float:
        return sum(self.seconds(spec, "out", spec.out_ch) for spec in specs)


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


def _truth(model: nn.Module, inputs: torch.Tensor = X) -> float:
    """What the fake device says the shrunk model's timed layers cost, plus its rest."""
    shapes = lm.timed_layers(model, inputs, [n for n, _ in model.named_modules()])
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
        ({"speedup": 2.0, "calibrate": -1}, "calibrate"),
        ({"speedup": 2.0, "macs_weight": 1.5}, "macs_weight"),
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


class FixedCostMeter(TableMeter):
    """A fake device whose whole model also pays a fixed cost per call (dispatch,
    activations of unchanged width) that the layer model takes for elementwise work
    shrinking with the layers' outputs: its predictions are off."""

    FIXED = 1e-3

    def __init__(self) -> None:
        super().__init__()
        self.models = 0

    def model(self, model: nn.Module, inputs: object) -> float:
        self.models += 1
        assert isinstance(inputs, torch.Tensor)
        return _truth(model, inputs) + self.FIXED


def _true_speedup(model: nn.Module, ratios: dict[str, float]) -> float:
    shrunk = copy.deepcopy(model)
    pk.shrink(shrunk, X, ratio=ratios)
    return (_truth(model) + FixedCostMeter.FIXED) / (_truth(shrunk) + FixedCostMeter.FIXED)


def test_the_check_corrects_an_over_promising_layer_model():
    model = _cnn()
    before = snapshot(model)
    blind = latency_plan(model, X, speedup=1.6, meter=FixedCostMeter(), calibrate=0, round_to=1)
    assert blind.measured_speedup is None
    blind_miss = abs(_true_speedup(model, blind.ratios) / 1.6 - 1)
    assert blind_miss > TOLERANCE  # the layer model alone misjudges the fixed cost
    meter = FixedCostMeter()
    plan = latency_plan(model, X, speedup=1.6, meter=meter, calibrate=3, round_to=1)
    assert_unchanged(model, before)  # checked on copies
    assert meter.models >= 2 * TURNS  # dense and shrunk, in turns
    assert plan.measured_speedup == pytest.approx(_true_speedup(model, plan.ratios), rel=1e-9)
    assert plan.speedup == pytest.approx(plan.measured_speedup, rel=1e-9)
    assert abs(plan.measured_speedup / 1.6 - 1) <= TOLERANCE < blind_miss
    assert "checked on cpu" in plan.notes[-1]
    short = latency_plan(model, X, speedup=1.6, meter=FixedCostMeter(), calibrate=1, round_to=1)
    assert "short of speedup=1.6" in short.notes[-1]  # one check, no correction


def test_next_goal_follows_the_line_through_two_checks():
    a = Allocation({}, 0.0, 0.0, True)
    one = [Checked(a, 0.6, 0.7)]
    assert next_goal(one, 0.5) == pytest.approx(0.5 * 0.6 / 0.7)
    two = [*one, Checked(a, 0.5, 0.65)]  # measured moves half as fast as predicted
    assert next_goal(two, 0.5) == pytest.approx(0.2)
    # bracketing checks (0.6 above, 0.4 below the wanted 0.5) win over the last two
    three = [Checked(a, 0.5, 0.6), Checked(a, 0.3, 0.4), Checked(a, 0.2, 0.3)]
    assert next_goal(three, 0.5) == pytest.approx(0.4)


def test_corrected_goal_and_the_best_check():
    """The allocator's goal is corrected by measured / predicted until a check is within
    tolerance; the closest check is returned last."""
    goals: list[float] = []

    def allocate_to(goal: float) -> Allocation:
        goals.append(goal)
        return Allocation({}, goal, 0.0, True)

    def check(alloc: Allocation) -> float:
        return 1.25 * alloc.latency  # the device is 25% slower than predicted

    first = allocate_to(0.5)
    alloc, checks = corrected(first, allocate_to, check, 1.0, 0.5, rounds=3)
    assert goals == [0.5, pytest.approx(0.4)]  # 0.5 x 0.5 / 0.625
    assert [c.measured for c in checks] == [pytest.approx(0.625), pytest.approx(0.5)]
    assert alloc.latency == pytest.approx(0.4)
    assert corrected(first, None, check, 1.0, 0.5, rounds=3)[1][-1].measured == 0.625
    assert corrected(first, allocate_to, lambda a: None, 1.0, 0.5, rounds=3) == (first, [])


def test_floor_is_counted_once_for_a_layer_shrinking_on_two_axes():
    # each axis: 2 us at width 0, 1 us per 8 channels; both halved: 2 + 8 / 4 = 4 us
    curve = Curve.fit({8: 3e-6, 16: 4e-6, 32: 6e-6, 64: 10e-6})
    assert curve.intercept() == pytest.approx(2e-6)
    axes = {a: Axis(64, curve, ((a, tuple(range(65))),)) for a in ("in", "out")}
    floor = floor_share(list(axes.values()))
    assert floor == pytest.approx(0.2)
    layer = LayerCost("conv", 10e-6, 1000, axes, floor=floor)
    assert layer.latency({"in": 32, "out": 32}) == pytest.approx(4e-6)
    assert layer.latency({"in": 64, "out": 32}) == pytest.approx(6e-6)  # one axis: its curve
    assert floor_share([axes["in"]]) == 0.0


def _two_layer_cost() -> tuple[ModelCost, dict[str, Family]]:
    """Family "cheap" on a layer with many MACs and little latency, "costly" on one with
    few MACs and much latency; "cheap" loses less importance per group."""
    line = Curve.fit({16: 1.6e-6, 32: 3.2e-6, 64: 6.4e-6})
    layers = tuple(
        LayerCost(name, seconds, macs, {"out": Axis(64, line, ((name, tuple(range(65))),))})
        for name, seconds, macs in (("cheap", 1e-6, 10**6), ("costly", 1e-5, 10**4))
    )
    lost = {"cheap": 0.01, "costly": 1.0}
    families = {n: Family(64, 8, tuple(v * i for i in range(65))) for n, v in lost.items()}
    return ModelCost(layers, 0.0, 0), families


@pytest.mark.parametrize(("weight", "cut"), [(0.0, "cheap"), (1.0, "costly")])
def test_macs_weight_steers_the_allocator_away_from_compute_heavy_cuts(weight, cut):
    cost, families = _two_layer_cost()
    t0 = cost.latency({"cheap": 64, "costly": 64})
    alloc = allocate(cost, families, lambda t, m: t <= 0.99 * t0, 0.8, weight)
    assert alloc.reached
    assert alloc.kept[cut] < 64 and alloc.kept[({"cheap", "costly"} - {cut}).pop()] == 64


def test_cached_points_follow_the_machine_speed(tmp_path, monkeypatch):
    spec, now = _spec(), {"factor": 1.0}
    monkeypatch.setattr(lm, "seconds", lambda fn, *a, **k: now["factor"] * 1e-3)
    lm.MeasuredLatency(cache_dir=tmp_path).layer(spec, "out", [4, 8])
    now["factor"] = 1.5  # the machine is slower now: cached points scale with it
    assert lm.MeasuredLatency(cache_dir=tmp_path).layer(spec, "out", [4]) == {4: 1.5e-3}
    now["factor"] = 5.0  # too far off: a stall when cached, timed again and rewritten
    assert lm.MeasuredLatency(cache_dir=tmp_path).layer(spec, "out", [4]) == {4: 5e-3}
    now["factor"] = 1.0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert dict(data["points"]) == {"4": 5e-3} or dict(data["points"]) == {4: 5e-3}


def test_seconds_counts_the_fastest_short_block(monkeypatch):
    """A stall (the first calls, 50 ms each) inflates the blocks it hits, not the result."""
    clock = {"t": 0.0, "calls": 0}

    def fn() -> None:
        clock["calls"] += 1
        clock["t"] += 0.05 if clock["calls"] <= 3 else 1e-4

    monkeypatch.setattr(lm.time, "perf_counter", lambda: clock["t"])
    assert lm.seconds(fn, 0.02) == pytest.approx(1e-4)


class DepthwiseBlockMeter(TableMeter):
    """The fake table, but depthwise convolutions work on blocks of 16 channels (half as
    slow as the layer before them here, not the slowest)."""

    @staticmethod
    def seconds(spec: lm.LayerSpec, axis: str, w: int) -> float:
        if not spec.depthwise:
            return TableMeter.seconds(spec, axis, w)
        rows = math.prod(spec.input_shape[2:]) * math.prod(spec.kernel)
        return 0.5e-9 * (-(-w // 16) * 16) * rows


def test_round_to_is_the_largest_block_of_a_familys_layers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(),
        nn.Conv2d(64, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    plan = latency_plan(model, X, speedup=1.2, meter=DepthwiseBlockMeter(), calibrate=0)
    assert plan.round_to["0"] == 16  # the depthwise layer's block, not the 1x1's 8
