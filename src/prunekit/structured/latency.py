"""Latency targets for :func:`prunekit.shrink`: per-family ratios chosen from measured latency.

    plan = pk.structured.latency_plan(model, x, speedup=2.0, batch_size=32)
    plan.ratios        # {family: ratio}: what pk.shrink(model, x, ratio=plan.ratios) takes
    plan, report = pk.structured.shrink_to_latency(model, x, speedup=2.0, batch_size=32)

A uniform ratio removes the same share of every family, but MACs are not latency: narrow
or depthwise layers, BatchNorm and activations do not get faster in proportion, and a
width that is not a multiple of the kernel's channel block runs as slowly as the next
multiple. The plan instead

1. times every conv / linear layer a family shrinks, alone, at its real input shape and
   a few widths on the target device (:mod:`~prunekit.structured.latency_measure`,
   cached on disk), and fits a monotone piecewise-linear curve per layer and axis
   (:mod:`~prunekit.structured.latency_model`);
2. learns each family's ``round_to``: the channel block below which the measured latency
   does not drop (:func:`~prunekit.structured.latency_model.learn_step`);
3. removes blocks of groups greedily by importance lost per latency saved
   (:mod:`~prunekit.structured.latency_alloc`), with the scores ``pk.shrink`` uses
   (:func:`~prunekit.structured.importance.score`; each family's divided by their mean
   unless the criterion's are comparable, as for ``scope="global"``), for a latency
   target with the MACs a move removes weighed in (``macs_weight``), until the predicted
   latency reaches ``dense / speedup`` or, with ``macs_ratio``, the predicted MACs reach
   ``macs_ratio x dense``;
4. with a ``speedup`` target, checks the plan on the device: shrinks a copy of the
   model, times it against the dense one and corrects the latency goal by what it
   measured (:mod:`~prunekit.structured.latency_check`; ``calibrate`` rounds). At batch 1
   on a CPU the layer model alone was 10-40% off the whole model (per-call costs,
   a machine whose speed drifts); the plan then reports the measured speed-up.

Planning reads the model and changes nothing; :func:`shrink_to_latency` then calls
``pk.shrink`` with the plan's ratios (exactness check included), which removes exactly
the planned number of groups of each family, the least important ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.table import Table
from torch import nn

from prunekit.errors import LatencyTargetError, PruningError
from prunekit.inputs import Inputs, LossFn
from prunekit.inputs import batch_size as batch_size_of
from prunekit.layers import require_model
from prunekit.spec import between, checked, integer
from prunekit.structured.graph import Ignore
from prunekit.structured.importance import StructuredCriterion, score
from prunekit.structured.latency_alloc import Allocation, Family, allocate
from prunekit.structured.latency_check import (
    TOLERANCE,
    Checked,
    corrected,
    measured_fraction,
    shrunk_copy,
)
from prunekit.structured.latency_cost import (
    allocator_families,
    as_deployed,
    learned_steps,
    model_cost,
    orders_of,
)
from prunekit.structured.latency_measure import LatencyMeter, MeasuredLatency, batched
from prunekit.structured.latency_model import (
    ModelCost,
    ratio_for,
)
from prunekit.structured.shrink import ShrinkReport, resolve_normalize, shrink, traced_graph
from prunekit.tables import TableReport

SPEEDUP = between(1.0, 100.0, open_low=True)
MACS_RATIO = between(0.0, 1.0, open_low=True, open_high=True)
MAX_RATIO = between(0.0, 1.0, open_low=True, open_high=True)
BATCH = integer(1, 1 << 20)
ROUND_TO = integer(1, 1 << 16)
CALIBRATE = integer(0, 10)
UNIT = between(0.0, 1.0)


@dataclass
class LatencyPlan(TableReport):
    """Per-family ratios for ``pk.shrink`` and what the cost model predicts for them.

    ``ratios`` holds the families the plan shrinks (the others stay whole); ``kept`` /
    ``totals`` their groups after / before; ``round_to`` the block each family's kept
    count is a multiple of (unless it stays whole); latencies are seconds per call at
    ``batch_size`` on ``device``: predicted by the cost model, or, where the plan was
    checked on the device (:mod:`~prunekit.structured.latency_check`), the dense latency
    times the measured fraction, ``measured_speedup`` then the speed-up measured for these
    ratios (confirm it with ``pk.analysis.speedup``)."""

    ratios: dict[str, float]
    kept: dict[str, int]
    totals: dict[str, int]
    round_to: dict[str, int]
    dense_latency_s: float
    latency_s: float
    macs_ratio: float
    batch_size: int
    device: str
    notes: list[str] = field(default_factory=list)
    measured_speedup: float | None = None

    @property
    def speedup(self) -> float:
        return self.dense_latency_s / max(self.latency_s, 1e-30)

    def table(self) -> Table:
        table = Table(
            title="prunekit latency plan",
            caption=f"{'measured' if self.measured_speedup else 'predicted'} "
            f"{self.dense_latency_s * 1e3:.3f} -> {self.latency_s * 1e3:.3f} "
            f"ms ({self.speedup:.2f}x) at batch {self.batch_size} on {self.device}, MACs x "
            f"{self.macs_ratio:.2f}" + "".join(f"\n{n}" for n in self.notes),
        )
        for col in ("family", "kept / total", "ratio", "round_to"):
            table.add_column(col, justify="left" if col == "family" else "right")
        for name, total in self.totals.items():
            kept, ratio = self.kept[name], self.ratios.get(name, 0.0)
            table.add_row(name, f"{kept} / {total}", f"{ratio:.3f}", str(self.round_to[name]))
        return table


class LatencyShrink(NamedTuple):
    plan: LatencyPlan
    report: ShrinkReport


def _target(speedup: float | None, macs_ratio: float | None) -> tuple[str, float]:
    if (speedup is None) == (macs_ratio is None):
        raise PruningError(
            f"speedup={speedup!r}, macs_ratio={macs_ratio!r}: give exactly one target; Fix: "
            "e.g. speedup=2.0 (half the latency) or macs_ratio=0.5 (half the MACs, at the "
            "best latency)."
        )
    if speedup is not None:
        return "speedup", checked("latency_plan", "speedup", speedup, SPEEDUP)
    return "macs_ratio", checked("latency_plan", "macs_ratio", macs_ratio, MACS_RATIO)


def _checked_args(
    model: nn.Module, speedup: float | None, macs_ratio: float | None, batch_size: int | None,
    round_to: int | None, max_ratio: float, criterion: StructuredCriterion, normalize: str,
    fold_bn: bool, calibrate: int, macs_weight: float,
) -> tuple[str, float, str]:  # fmt: skip
    """Every argument checked before anything runs: ``(target kind, value, normalize)``."""
    require_model(model, real=True)
    kind, value = _target(speedup, macs_ratio)
    if batch_size is not None:
        checked("latency_plan", "batch_size", batch_size, BATCH)
    if round_to is not None:
        checked("latency_plan", "round_to", round_to, ROUND_TO)
    checked("latency_plan", "max_ratio", max_ratio, MAX_RATIO)
    if not isinstance(fold_bn, bool):
        raise PruningError(f"fold_bn={fold_bn!r} must be True or False")
    checked("latency_plan", "calibrate", calibrate, CALIBRATE)
    checked("latency_plan", "macs_weight", macs_weight, UNIT)
    return kind, value, resolve_normalize(normalize, criterion)


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    own = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device is None:
        return own
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PruningError(f"device={device!r} is not a torch device ({exc}); Fix: e.g. "
                           "device='cpu' or 'cuda'.") from None  # fmt: skip
    if wanted.type != own.type:
        raise PruningError(
            f"device={device!r} but the model lives on {own}; Fix: move the model and the "
            "example inputs to the target device first (model.to(device))."
        )
    return wanted


def _ratios(kept: Mapping[str, int], families: Mapping[str, Family]) -> dict[str, float]:
    """``pk.shrink``'s ratio of every family that loses groups."""
    return {n: ratio_for(f.total, kept[n]) for n, f in families.items() if kept[n] < f.total}


def _result(
    alloc: Allocation, families: Mapping[str, Family], cost: ModelCost, size: int,
    device: torch.device, meter: LatencyMeter, checks: list[Checked],
) -> LatencyPlan:  # fmt: skip
    whole = {name: f.total for name, f in families.items()}
    follow = sum(layer.follow for layer in cost.layers)
    notes = [
        f"{len(cost.layers)} layers timed in isolation ({type(meter).__name__}); the rest "
        f"of the model ({follow * 1e3:.3f} ms) scales with their output widths"
    ]
    dense = cost.latency(whole)
    latency, measured = alloc.latency, None
    if checks:
        last = checks[-1]
        latency, measured = dense * last.measured, 1.0 / last.measured
        notes.append(
            f"checked on {device}: the shrunk copy measured {measured:.2f}x where the layer "
            f"model predicted {1.0 / last.predicted:.2f}x ({len(checks)} check(s))"
        )
    return LatencyPlan(
        _ratios(alloc.kept, families), dict(alloc.kept),
        {n: f.total for n, f in families.items()}, {n: f.step for n, f in families.items()},
        dense, latency, alloc.macs / max(cost.macs(whole), 1.0), size, str(device), notes,
        measured,
    )  # fmt: skip


def _note_shortfall(plan: LatencyPlan, kind: str, value: float) -> None:
    """A note where the checked speed-up stays short of the target (beyond
    :data:`~prunekit.structured.latency_check.TOLERANCE`): the plan is the closest one
    measured, not an error."""
    measured = plan.measured_speedup
    if kind == "speedup" and measured is not None and measured < value * (1 - TOLERANCE):
        plan.notes.append(
            f"short of speedup={value:g}: the closest plan checked measured {measured:.2f}x "
            "(the corrected goal was out of the layer model's reach, or the checks ran "
            "out); ask for less, or raise calibrate or max_ratio"
        )


def _allocator(
    cost: ModelCost, families: Mapping[str, Family], kind: str, max_ratio: float,
    macs_weight: float,
) -> Callable[[float], Allocation]:  # fmt: skip
    """``fraction -> allocation`` reaching ``fraction`` of the dense model's predicted
    latency (``kind="speedup"``, MACs weighed by ``macs_weight``) or MACs
    (``"macs_ratio"``: the best latency for them, importance alone)."""
    whole = {name: f.total for name, f in families.items()}
    dense = cost.latency(whole) if kind == "speedup" else cost.macs(whole)
    index = 0 if kind == "speedup" else 1
    weight = macs_weight if kind == "speedup" else 0.0

    def allocate_to(fraction: float) -> Allocation:
        goal = fraction * dense
        done = lambda t, m: (t, m)[index] <= goal  # noqa: E731
        return allocate(cost, families, done, max_ratio, weight)

    return allocate_to


def _checker(
    model: nn.Module, example_inputs: Inputs, size: int, families: Mapping[str, Family],
    meter: LatencyMeter, fold_bn: bool, shrink_kwargs: dict[str, Any],
) -> Callable[[Allocation], float | None]:  # fmt: skip
    """``allocation -> measured latency fraction`` of the model shrunk (on a copy) to it,
    at batch ``size`` (:mod:`~prunekit.structured.latency_check`)."""
    big = batched(example_inputs, size)
    dense = as_deployed(model, big, fold_bn)

    def cut(small: nn.Module, inputs: Inputs, ratios: dict[str, float]) -> None:
        shrink(small, inputs, ratios, verify=False, **shrink_kwargs)

    def check(alloc: Allocation) -> float | None:
        ratios = _ratios(alloc.kept, families)
        if not ratios:
            return 1.0
        small = shrunk_copy(model, example_inputs, ratios, cut,
                            lambda m: as_deployed(m, big, fold_bn))  # fmt: skip
        return measured_fraction(dense, small, big, meter)

    return check


def _unreachable(
    model: nn.Module, kind: str, value: float, max_ratio: float, alloc: Allocation,
    dense: tuple[float, float],
) -> LatencyTargetError:  # fmt: skip
    t0, m0 = dense
    best = t0 / alloc.latency if kind == "speedup" else alloc.macs / m0
    return LatencyTargetError(
        f"{kind}={value:g} is out of reach of {type(model).__name__}'s removable "
        f"channels with max_ratio={max_ratio:g}: the plan reaches {kind} {best:.3g} "
        f"(predicted {t0 * 1e3:.3f} -> {alloc.latency * 1e3:.3f} ms). Fix: ask for "
        "less, or raise max_ratio."
    )


def latency_plan(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    speedup: float | None = None,
    macs_ratio: float | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    criterion: StructuredCriterion = "l2",
    normalize: str = "auto",
    round_to: int | None = None,
    max_ratio: float = 0.8,
    ignore: Ignore = (),
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    fold_bn: bool = False,
    meter: LatencyMeter | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    calibrate: int = 3,
    macs_weight: float = 0.5,
) -> LatencyPlan:
    """Per-family ratios that reach ``speedup`` (predicted dense latency / shrunk latency)
    or ``macs_ratio`` (MACs kept, at the best predicted latency) on ``device`` at
    ``batch_size`` (default: the example inputs'; their first dimension is the batch).
    See the module docstring. Changes nothing: pass ``plan.ratios`` to ``pk.shrink``
    with the same ``criterion``, or call :func:`shrink_to_latency`.

    ``round_to=None`` learns each family's block from the measurements; an int imposes
    it on every family. No family loses more than ``max_ratio`` of its groups. With
    ``fold_bn`` the whole model is timed as :func:`~prunekit.structured.fold.fold_batchnorm`
    leaves it (fold before deploying; the plan itself changes nothing). ``meter``
    replaces the timing (default :class:`~prunekit.structured.latency_measure.MeasuredLatency`
    on ``device``, cached under ``cache_dir``; ``cache=False``: no cache). ``calibrate``:
    how many times a ``speedup`` plan is checked on the device, shrinking a copy of the
    model and timing it against the dense one, its goal corrected by what was measured
    (:mod:`~prunekit.structured.latency_check`; a ``macs_ratio`` plan is checked once, to
    report its measured speed-up; 0: the cost model's prediction alone, no check).
    ``macs_weight`` (in [0, 1]): with a ``speedup`` target, how much the MACs a move
    removes count against it next to the importance it loses
    (:mod:`~prunekit.structured.latency_alloc`; 0: importance alone).

    Raises:
        LatencyTargetError: the target is out of reach (the best reachable is named).
        PruningError: bad arguments (named with the fix), before anything runs.
        InvalidInputsError, UntraceableError: as ``pk.shrink``.
        LatencyCacheError: a corrupt latency cache file (named).
    """
    kind, value, normalize = _checked_args(
        model, speedup, macs_ratio, batch_size, round_to, max_ratio, criterion, normalize,
        fold_bn, calibrate, macs_weight,
    )  # fmt: skip
    where = _device(model, device)
    meter = meter or MeasuredLatency(where, cache=cache, cache_dir=cache_dir)
    graph = traced_graph(model, example_inputs, ignore)
    scores = score(model, graph, criterion, data=data, loss_fn=loss_fn, seed=seed)
    size = batch_size or batch_size_of(example_inputs)
    orders = orders_of(graph, scores)
    cost, specs = model_cost(model, example_inputs, size, graph, orders, meter, fold_bn)
    steps = learned_steps(cost, specs, graph, meter) if round_to is None else {}
    steps = {f.name: steps.get(f.name, round_to or 1) for f in graph.families}
    families = allocator_families(graph, scores, steps, normalize)
    whole = {name: f.total for name, f in families.items()}
    allocate_to = _allocator(cost, families, kind, max_ratio, macs_weight)
    want = 1.0 / value if kind == "speedup" else value
    alloc = allocate_to(want)
    if not alloc.reached:
        dense = (cost.latency(whole), cost.macs(whole))
        raise _unreachable(model, kind, value, max_ratio, alloc, dense)
    checks: list[Checked] = []
    if calibrate:
        shared = {"criterion": criterion, "ignore": ignore, "data": data, "loss_fn": loss_fn,
                  "seed": seed}  # fmt: skip
        check = _checker(model, example_inputs, size, families, meter, fold_bn, shared)
        rounds = calibrate if kind == "speedup" else 1
        alloc, checks = corrected(alloc, allocate_to if kind == "speedup" else None, check,
                                  cost.latency(whole), want, rounds)  # fmt: skip
    plan = _result(alloc, families, cost, size, where, meter, checks)
    _note_shortfall(plan, kind, value)
    return plan


def shrink_to_latency(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    criterion: StructuredCriterion = "l2",
    ignore: Ignore = (),
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    verify: bool = True,
    **plan_kwargs: Any,
) -> LatencyShrink:
    """:func:`latency_plan`, then ``pk.shrink(model, example_inputs, ratio=plan.ratios)``
    with the same criterion (the only step that changes the model). ``plan_kwargs`` are
    :func:`latency_plan`'s target and timing arguments (``speedup=2.0``...)."""
    shared = {"criterion": criterion, "ignore": ignore, "data": data, "loss_fn": loss_fn,
              "seed": seed}  # fmt: skip
    plan = latency_plan(model, example_inputs, **shared, **plan_kwargs)
    if not plan.ratios:
        raise LatencyTargetError("the plan removes nothing; Fix: ask for a larger target.")
    report = shrink(model, example_inputs, plan.ratios, verify=verify, **shared)
    return LatencyShrink(plan, report)


__all__ = [
    "LatencyPlan",
    "LatencyShrink",
    "LatencyTargetError",
    "latency_plan",
    "shrink_to_latency",
]
