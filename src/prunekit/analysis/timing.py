"""Honest timing: every latency and speed-up prunekit reports is measured here.

A model is timed with ``torch.utils.benchmark.Timer.blocked_autorange`` (eval mode, under
``torch.inference_mode``, one warm-up call first, ``torch.get_num_threads()`` threads; the
timer synchronises CUDA). Several models are timed in *interleaved turns*: each turn times
every model once, for ``min_run_time / repeats`` seconds each, so a change of load on a
shared machine falls on all of them alike.

:func:`speedup` gives the speed-up of ``b`` over ``a`` with its spread. With ``t_a,i`` and
``t_b,i`` the median seconds per call of turn ``i = 1..R``:

    ratio      = median_i (t_a,i / t_b,i)          (> 1: b is faster)
    low, high  = min_i, max_i (t_a,i / t_b,i)      (the spread over turns)
    latency_a  = median_i t_a,i,   latency_b = median_i t_b,i

The figure is flagged unreliable (``reliable=False`` and a :class:`UserWarning`) when the
1-minute load average exceeds the number of cores (the timed threads waited for a core)
or when ``(high - low) / ratio > SPREAD_LIMIT`` (the turns disagree).
"""

from __future__ import annotations

import os
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils import benchmark

from prunekit.inputs import Inputs, call, eval_mode
from prunekit.layers import require_model
from prunekit.spec import between, checked, integer

MIN_RUN_TIME = between(0.0, 3600.0, open_low=True)  # seconds: a call that ends
REPEATS = integer(3, 1000)  # a spread needs several turns
SPREAD_LIMIT = 0.25
"""Largest ``(high - low) / ratio`` of a reliable speed-up."""
LOAD_LIMIT = 1.0
"""Largest ``load average / cores`` of a reliable measurement."""


def _time_once(model: nn.Module, example_inputs: Inputs, seconds: float) -> float:
    """Median seconds per call of ``model`` over ``seconds`` of ``blocked_autorange``."""
    with eval_mode(model), torch.inference_mode():
        call(model, example_inputs)
        timer = benchmark.Timer(
            stmt="call(model, inputs)",
            globals={"call": call, "model": model, "inputs": example_inputs},
            num_threads=torch.get_num_threads(),
        )
        return timer.blocked_autorange(min_run_time=seconds).median


def _turns(
    models: Sequence[nn.Module], example_inputs: Inputs, min_run_time: float, rounds: int
) -> list[list[float]]:
    """Per model, its median seconds in each of ``rounds`` interleaved turns."""
    per_model: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for model, times in zip(models, per_model, strict=True):
            times.append(_time_once(model, example_inputs, min_run_time / rounds))
    return per_model


def measure_latency(model: nn.Module, example_inputs: Inputs, min_run_time: float = 0.2) -> float:
    """Median seconds of ``model`` on ``example_inputs`` (see :mod:`prunekit.inputs`) over at
    least ``min_run_time`` seconds of timing. One latency, no ratio: compare models with
    :func:`speedup`."""
    return measure_latencies([model], example_inputs, min_run_time, rounds=1)[0]


def measure_latencies(
    models: Sequence[nn.Module],
    example_inputs: Inputs,
    min_run_time: float = 0.2,
    rounds: int = 3,
) -> list[float]:
    """Median seconds of each of ``models``, timed in ``rounds`` interleaved turns (see the
    module docstring); a model's result is the median of its turns."""
    turns = _turns(models, example_inputs, min_run_time, rounds)
    return [statistics.median(times) for times in turns]


@dataclass(frozen=True)
class Speedup:
    """The speed-up of model ``b`` over model ``a``, its spread and the machine's load."""

    ratio: float
    low: float
    high: float
    latency_a_s: float
    latency_b_s: float
    repeats: int
    load_average: float | None
    cores: int
    reliable: bool
    reason: str

    def to_dict(self) -> dict[str, object]:
        """Plain, JSON-serialisable fields."""
        return asdict(self)

    def __str__(self) -> str:
        load = "n/a" if self.load_average is None else f"{self.load_average:.2f}"
        text = (
            f"{self.ratio:.2f}x (range {self.low:.2f}-{self.high:.2f} over {self.repeats} "
            f"interleaved repeats; {self.latency_a_s * 1e3:.3f} -> {self.latency_b_s * 1e3:.3f} "
            f"ms; load {load} on {self.cores} cores)"
        )
        return text if self.reliable else f"{text} UNRELIABLE: {self.reason}"


def _unreliable(ratio: float, low: float, high: float, load: float | None, cores: int) -> str:
    """Why the figure cannot be trusted, or ``""``."""
    reasons = []
    if load is not None and load / cores > LOAD_LIMIT:
        reasons.append(
            f"load average {load:.2f} on {cores} cores is above {LOAD_LIMIT:g} per core "
            "(the timed threads waited for a core); time on an idle machine"
        )
    if (high - low) / ratio > SPREAD_LIMIT:
        reasons.append(
            f"the repeats disagree (ratios {low:.2f}-{high:.2f}, more than "
            f"{SPREAD_LIMIT:.0%} of the median); raise repeats or min_run_time"
        )
    return "; ".join(reasons)


def speedup(
    a: nn.Module,
    b: nn.Module,
    example_inputs: Inputs,
    *,
    repeats: int = 5,
    min_run_time: float = 1.0,
) -> Speedup:
    """How much faster ``b`` runs than ``a`` on ``example_inputs``: the median of ``t_a / t_b``
    over ``repeats`` interleaved turns, with its min-max spread, each model's median latency
    and the 1-minute load average (see the module docstring). ``min_run_time`` seconds of
    timing are spent on each model in all.

    Warns (:class:`UserWarning`) and sets ``reliable=False`` when the load or the spread
    makes the figure untrustworthy.

    Raises:
        PruningError: ``repeats`` is not an int in 3..1000 or ``min_run_time`` not in
            (0, 3600] seconds; ``a`` or ``b`` is not a module or lives on the meta device.
    """
    checked("speedup", "repeats", repeats, REPEATS)
    checked("speedup", "min_run_time", min_run_time, MIN_RUN_TIME)
    require_model(a, real=True)
    require_model(b, real=True)
    times_a, times_b = _turns([a, b], example_inputs, min_run_time, repeats)
    ratios = [ta / tb for ta, tb in zip(times_a, times_b, strict=True)]
    ratio, low, high = statistics.median(ratios), min(ratios), max(ratios)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cores = os.cpu_count() or 1
    reason = _unreliable(ratio, low, high, load, cores)
    if reason:
        warnings.warn(f"speed-up {ratio:.2f}x is unreliable: {reason}", UserWarning, stacklevel=2)
    return Speedup(
        ratio=ratio,
        low=low,
        high=high,
        latency_a_s=statistics.median(times_a),
        latency_b_s=statistics.median(times_b),
        repeats=repeats,
        load_average=load,
        cores=cores,
        reliable=not reason,
        reason=reason,
    )
