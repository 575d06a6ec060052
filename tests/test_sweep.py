"""Tests for :func:`prunekit.analysis.sweep.sweep` and :class:`SweepReport`."""

from __future__ import annotations

import csv
import importlib
import io
import json
import statistics

import pytest
import torch
from torch import nn

from prunekit import zoo
from prunekit.analysis.plots import plot_accuracy_vs_sparsity, plot_latency_vs_macs
from prunekit.analysis.sweep import SweepReport, sweep
from prunekit.errors import InvalidSparsityError, PruningError, SweepError, UnknownChoiceError

SEEDS = (0, 1)
GRID = (0.5, 0.8)
DATA = zoo.load_dataset("digits", flat=True)
sweep_mod = importlib.import_module("prunekit.analysis.sweep")  # the attribute is the function
timing_mod = importlib.import_module("prunekit.analysis.timing")


def build_and_train(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = zoo.build_model("lenet300", in_features=64)
    zoo.train(model, DATA, epochs=1, seed=seed, progress=False)
    return model


def accuracy(model: nn.Module) -> float:
    return zoo.evaluate(model, DATA.x_test, DATA.y_test)


@pytest.fixture(scope="module")
def report() -> SweepReport:
    return sweep(
        build_and_train,
        accuracy,
        methods={"global": {"scope": "global", "include_output": True}},  # every layer
        sparsities=GRID,
        seeds=SEEDS,
        example_inputs=DATA.x_test[:1],
        min_run_time=0.01,
        progress=False,
    )


def test_every_point_is_measured_with_the_random_baseline(report: SweepReport) -> None:
    keys = [(p.method, p.sparsity, p.seed) for p in report.points]
    expected = [
        (m, s, seed)
        for seed in SEEDS
        for m, s in [("dense", 0.0)] + [(m, s) for m in ("global", "random") for s in GRID]
    ]
    assert keys == expected
    dense = {p.seed: p for p in report.points if p.method == "dense"}
    assert dense[1].metric == accuracy(build_and_train(1))  # deterministic per seed
    for p in report.points:
        ref = dense[p.seed]
        assert p.achieved_sparsity == pytest.approx(p.sparsity, abs=1e-3)
        assert p.compression == pytest.approx(ref.params / p.nonzero)
        assert p.theoretical_speedup == pytest.approx(ref.macs / p.effective_macs)
        assert p.measured_speedup == pytest.approx(p.dense_latency_ms / p.latency_ms)
        assert p.macs == ref.macs  # masked zeros still run dense kernels
    at_80 = [p for p in report.points if p.sparsity == 0.8]
    assert all(p.compression > 4 and p.theoretical_speedup > 4 for p in at_80)


def test_magnitude_beats_the_random_baseline(report: SweepReport) -> None:
    rows = {(r["method"], r["sparsity"]): r for r in report.summary()}
    assert rows[("global", 0.5)]["metric_mean"] > rows[("random", 0.5)]["metric_mean"] + 0.2
    assert rows[("dense", 0.0)]["metric_mean"] > 0.7


def test_summary_is_mean_and_sample_std_over_seeds(report: SweepReport) -> None:
    for row in report.summary():
        group = [
            p for p in report.points if (p.method, p.sparsity) == (row["method"], row["sparsity"])
        ]
        values = [p.metric for p in group]
        assert row["seeds"] == len(SEEDS)
        assert row["metric_mean"] == pytest.approx(statistics.fmean(values))
        assert row["metric_std"] == pytest.approx(statistics.stdev(values))


def test_rows_curves_and_table_feed_csv_json_and_plots(report: SweepReport) -> None:
    for rows in (report.to_rows(), report.to_rows(per_seed=True)):
        assert json.loads(json.dumps(rows)) == rows
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        assert len(buffer.getvalue().splitlines()) == len(rows) + 1
    assert len(report.to_rows(per_seed=True)) == len(report.points)
    curves = report.curves()
    assert set(curves) == {"global", "random"}
    dense = [p.metric for p in report.points if p.method == "dense"]
    for curve in curves.values():
        assert list(curve) == [0.0, *GRID] and curve[0.0] == dense
        assert all(len(v) == len(SEEDS) for v in curve.values())
    plot_accuracy_vs_sparsity(curves)
    series = report.latency_vs_macs()
    assert [len(s) for s in series.values()] == [1 + len(GRID)] * 2
    assert all(len(point) == 3 and point[2] >= 0 for s in series.values() for point in s)
    plot_latency_vs_macs(series)
    text = str(report)
    assert "random" in text and "global" in text and "±" in text


def _never(seed: int) -> nn.Module:
    raise AssertionError("bad input must be caught before any training")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"seeds": ()}, SweepError),
        ({"sparsities": ()}, SweepError),
        ({"sparsities": (0.0, 0.5)}, SweepError),
        ({"sparsities": (1.0,)}, InvalidSparsityError),
        ({"methods": {"random": {}}}, SweepError),
        ({"methods": {"m": {"sparsity": 0.5}}}, SweepError),
        ({"methods": {"m": {"criterion": "nope"}}}, UnknownChoiceError),
        ({"methods": {"m": {"granularity": "nope"}}}, UnknownChoiceError),
        ({"materialize": "csr"}, SweepError),
    ],
)
def test_bad_input_fails_before_training(kwargs: dict, error: type[Exception]) -> None:
    args = {"methods": {}, "sparsities": (0.5,), "seeds": (0,)} | kwargs
    with pytest.raises(error) as err:
        sweep(_never, accuracy, example_inputs=torch.zeros(1, 64), progress=False, **args)
    assert isinstance(err.value, PruningError)


@pytest.mark.parametrize("order", [("hidden", "every"), ("every", "hidden")])
def test_the_random_baseline_prunes_every_layer_some_method_prunes(order: tuple) -> None:
    given = {"hidden": {}, "every": {"include_output": True}}
    report = sweep(build_and_train, accuracy, methods={m: given[m] for m in order},
                   sparsities=(0.5,), seeds=(0,), example_inputs=DATA.x_test[:1],
                   min_run_time=0.01, progress=False)  # fmt: skip
    achieved = {p.method: p.achieved_sparsity for p in report.points}
    assert achieved["every"] == pytest.approx(0.5, abs=1e-3)  # fc3 too
    assert achieved["hidden"] < 0.499  # fc3 dense
    assert achieved["random"] == pytest.approx(0.5, abs=1e-3)  # not the first method's choice


def test_finetune_runs_on_each_pruned_copy_and_bad_metrics_are_refused() -> None:
    calls: list[tuple[float, int]] = []

    def finetune(model: nn.Module, seed: int) -> None:
        calls.append((float((model[0].weight == 0).float().mean()), seed))

    untrained = lambda seed: nn.Sequential(nn.Linear(8, 8))  # noqa: E731
    report = sweep(
        untrained,
        lambda m: 1.0,
        methods={},
        sparsities=(0.5,),
        seeds=(3,),
        example_inputs=torch.zeros(1, 8),
        finetune=finetune,
        min_run_time=0.01,
        progress=False,
    )
    assert calls == [(0.5, 3)]
    assert [p.method for p in report.points] == ["dense", "random"]
    with pytest.raises(PruningError, match="finite float"):
        sweep(
            untrained,
            lambda m: float("nan"),
            methods={},
            sparsities=(0.5,),
            seeds=(0,),
            example_inputs=torch.zeros(1, 8),
            progress=False,
        )


def _timed_models(monkeypatch: pytest.MonkeyPatch, materialize: str) -> list[nn.Module]:
    """Run a one-seed row-pruning sweep; return the (dense, pruned) models timed together."""
    timed: list[nn.Module] = []

    def record(models, example_inputs, min_run_time, rounds):  # the real one is timing's
        timed.extend(models)
        return [[1e-3] * rounds for _ in models]

    monkeypatch.setattr(timing_mod, "_turns", record)
    sweep(
        build_and_train,
        accuracy,
        methods={"rows": {"granularity": "row", "criterion": "l2", "exclude": ["fc3"]}},
        sparsities=(0.5,),
        seeds=(0,),
        example_inputs=DATA.x_test[:4],
        materialize=materialize,
        progress=False,
    )
    return timed


def test_shrink_materialisation_times_the_physically_smaller_model(monkeypatch) -> None:
    timed = _timed_models(monkeypatch, "shrink")
    dense, rows = timed[1], timed[2]  # timed[0]: the dense point alone
    widths = [m.out_features for m in rows.modules() if isinstance(m, nn.Linear)]
    assert widths == [150, 50, 10]
    assert [m.out_features for m in dense.modules() if isinstance(m, nn.Linear)] == [300, 100, 10]
    assert torch.equal(rows(DATA.x_test), rows(DATA.x_test))  # runs


def test_sparse_materialisation_converts_at_the_examples_batch_size(monkeypatch) -> None:
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(
        sweep_mod, "convert", lambda model, fmt, batch_size: calls.append((fmt, batch_size))
    )
    _timed_models(monkeypatch, "sparse")
    assert calls == [("auto", 4)] * 2  # the method and the random baseline
