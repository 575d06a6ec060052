"""pk.analysis.speedup: interleaved repeats, a median ratio with its spread, the load."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.analysis import timing
from prunekit.errors import PruningError


def _stack(depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(depth)])


X = torch.randn(64, 256)


def _quiet_speedup(a: nn.Module, b: nn.Module, **kwargs: object) -> timing.Speedup:
    with warnings.catch_warnings():  # a loaded CI machine may flag the figure
        warnings.simplefilter("ignore", UserWarning)
        return pk.analysis.speedup(a, b, X, **kwargs)  # type: ignore[arg-type]


def test_a_model_against_itself_is_about_1_with_its_spread() -> None:
    model = _stack(2)
    result = _quiet_speedup(model, model, repeats=5, min_run_time=0.1)
    assert 0.5 < result.ratio < 2.0
    assert result.low <= result.ratio <= result.high
    assert result.repeats == 5 and result.cores >= 1
    assert result.latency_a_s > 0 and result.latency_b_s > 0
    assert json.loads(json.dumps(result.to_dict()))["repeats"] == 5
    assert "interleaved repeats" in str(result)


def test_a_model_doing_four_times_the_work_is_slower() -> None:
    result = _quiet_speedup(_stack(8), _stack(2), repeats=3, min_run_time=0.15)
    assert result.ratio > 1.5
    reverse = _quiet_speedup(_stack(2), _stack(8), repeats=3, min_run_time=0.15)
    assert reverse.ratio < 1 / 1.5


def test_load_or_spread_flags_the_figure_unreliable_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    with pytest.warns(UserWarning, match="unreliable: load average 64.00 on 2 cores"):
        result = pk.analysis.speedup(_stack(1), _stack(1), X, repeats=3, min_run_time=0.03)
    assert not result.reliable and "load average" in result.reason
    assert "UNRELIABLE" in str(result)
    assert "repeats disagree" in timing._unreliable(1.0, 0.5, 1.5, None, 2)
    assert timing._unreliable(1.0, 0.95, 1.05, 1.0, 2) == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeats": 2}, "speedup.repeats=2 is not an int 3..1000"),
        ({"repeats": 3.0}, "speedup.repeats=3.0"),
        ({"min_run_time": 0.0}, "speedup.min_run_time=0.0"),
        ({"min_run_time": float("inf")}, "speedup.min_run_time=inf"),
    ],
)
def test_arguments_are_validated_before_timing(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PruningError, match=message.replace(".", r"\.")):
        pk.analysis.speedup(_stack(1), _stack(1), X, **kwargs)  # type: ignore[arg-type]


def test_a_non_module_is_refused() -> None:
    with pytest.raises(PruningError):
        pk.analysis.speedup(_stack(1), "resnet", X)  # type: ignore[arg-type]
