"""Checking a latency plan on the device, for :func:`~prunekit.structured.latency.latency_plan`.

The cost model (:mod:`~prunekit.structured.latency_model`) adds up layers timed alone,
at other moments (the cache keeps them across runs), plus the rest of the model's time
estimated as the whole model's minus theirs. On a CPU whose speed drifts (a shared
machine, frequency scaling: the same MobileNetV2 call measured 7.3 ms and 12 ms a minute
apart on a 2-core VM) and at batch 1, where per-call overheads weigh as much as the
arithmetic, that sum misjudges the shrunk model by 10-40%. So for a ``speedup`` target
the plan is **checked**: the model is shrunk on a copy with the plan's ratios (BatchNorm
folded with ``fold_bn``), the dense and the shrunk copies are timed in interleaved turns
(the median of the turns' ratios: a drift of the machine's speed moves both alike, a
stall inflates one turn), and the latency goal handed to the allocator is corrected by
what the check measured (``goal = want x predicted / measured``, then on the line
through two checks: :func:`next_goal`), for up to ``calibrate`` rounds or until the
measured fraction is within ``TOLERANCE`` of the target. The plan reports the measured
speed-up of its ratios. The model itself is never changed.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunekit.inputs import Inputs
from prunekit.structured.latency_alloc import Allocation
from prunekit.structured.latency_measure import LatencyMeter

TOLERANCE = 0.04
"""A measured latency fraction within this share of the target stops the correction."""
TURNS = 5
"""Interleaved turns of a comparison (dense and shrunk model, whole model and its layers);
the median of the turns' ratios counts."""


@dataclass(frozen=True)
class Checked:
    """One checked allocation: its predicted and measured latency fractions (shrunk /
    dense)."""

    alloc: Allocation
    predicted: float
    measured: float


def turn_ratio(numerator: Callable[[], float], denominator: Callable[[], float]) -> float | None:
    """The median over :data:`TURNS` interleaved turns of ``numerator() /
    denominator()``, both timed in each turn (a drift of the machine's speed moves both
    alike; a stall inflates one turn, which the median leaves out); None when the
    denominator is timed as 0 seconds (a meter that does not time it)."""
    ratios = []
    for _ in range(TURNS):
        low = denominator()
        if low <= 0.0:
            return None
        ratios.append(numerator() / low)
    return statistics.median(ratios)


def measured_fraction(
    dense: nn.Module, small: nn.Module, inputs: Inputs, meter: LatencyMeter
) -> float | None:
    """Seconds of ``small`` / seconds of ``dense`` on ``inputs`` (:func:`turn_ratio`);
    None when the meter does not time whole models (it says 0 seconds for the dense one)."""
    return turn_ratio(lambda: meter.model(small, inputs), lambda: meter.model(dense, inputs))


def shrunk_copy(
    model: nn.Module, example_inputs: Inputs, ratios: dict[str, float],
    shrink: Callable[..., Any], deploy: Callable[[nn.Module], nn.Module],
) -> nn.Module:  # fmt: skip
    """A copy of ``model`` shrunk with ``shrink(copy, example_inputs, ratios)`` and made
    ready to time by ``deploy`` (e.g. BatchNorm folded); ``model`` is left as it was."""
    small = copy.deepcopy(model)
    shrink(small, example_inputs, ratios)
    return deploy(small.eval())


def corrected(
    first: Allocation, allocate_to: Callable[[float], Allocation] | None,
    check: Callable[[Allocation], float | None], dense_latency: float, want: float,
    rounds: int,
) -> tuple[Allocation, list[Checked]]:  # fmt: skip
    """The allocation whose measured latency fraction comes closest to ``want`` (within
    :data:`TOLERANCE`, else preferably below it), starting from ``first`` and correcting
    the allocator's goal (a fraction of the predicted dense latency) after each
    ``check``; every check made is returned, the chosen one last, measured again where
    it was chosen among several (the luckiest of noisy measurements over-states).
    ``allocate_to=None`` (a MACs target): ``first`` is checked once, not corrected.
    Stops early when the meter cannot time models or a corrected goal is out of the
    allocator's reach."""
    alloc, checks = first, []
    for _ in range(rounds):
        measured = check(alloc)
        if measured is None:
            break
        checks.append(Checked(alloc, alloc.latency / dense_latency, measured))
        if allocate_to is None or abs(measured / want - 1.0) <= TOLERANCE:
            break
        nxt = allocate_to(next_goal(checks, want))
        if not nxt.reached:
            break
        alloc = nxt
    if not checks:
        return alloc, checks
    best = min(checks, key=lambda c: _miss(c.measured, want))
    others = [c for c in checks if c is not best]
    again = check(best.alloc) if others else None  # the best of noisy checks flatters it
    if again is not None:
        best = Checked(best.alloc, best.predicted, again)
    return best.alloc, [*others, best]


def next_goal(checks: list[Checked], want: float) -> float:
    """The predicted fraction expected to measure ``want``: on the line through two
    checks, the nearest on either side of ``want`` where there are such (regula falsi:
    the layer model's error changes with what is cut, and the cuts are coarse), else the
    last two; with one check, or where that line says nothing positive,
    ``want x predicted / measured`` of the last."""
    last = checks[-1]
    above = [c for c in checks if c.measured > want]
    below = [c for c in checks if c.measured <= want]
    if above and below:
        pair = (min(above, key=lambda c: c.measured), max(below, key=lambda c: c.measured))
    else:
        pair = (checks[-2], last) if len(checks) > 1 else (last, last)
    one, two = pair
    if one.measured != two.measured:
        slope = (two.predicted - one.predicted) / (two.measured - one.measured)
        goal = two.predicted + (want - two.measured) * slope
        if goal > 0.0:
            return goal
    return want * last.predicted / last.measured


def _miss(measured: float, want: float) -> float:
    """How far ``measured`` misses ``want``: within tolerance counts as 0; short of the
    target (slower) weighs more than overshooting it."""
    error = measured / want - 1.0
    if abs(error) <= TOLERANCE:
        return 0.0
    return 3.0 * error if error > 0 else -error
