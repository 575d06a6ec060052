"""Sweeps: a metric, MACs and measured latency vs sparsity, for several methods and seeds.

For each seed ``k`` the user's ``build_and_train(k)`` gives a trained model. Its dense
point is measured, then for each method and sparsity ``s`` a pruned copy
(:func:`prunekit.prune` with the method's keyword arguments, ``seed=k``), optionally
fine-tuned, is evaluated and profiled (masks baked, see :func:`prunekit.analysis.profile`).
The random-pruning baseline ``{"criterion": "random"}`` is always included; it prunes
every layer some method prunes (``include_output`` / ``include_embeddings`` when any method
sets them).

Per point, over the prunable layers, with ``P`` params, ``Z`` nonzeros, ``M`` MACs,
``E`` effective MACs and ``t`` the measured latency:

compression ratio       ``P_dense / Z``
theoretical speed-up    ``M_dense / E`` (what a kernel skipping every zero could reach)
measured speed-up       ``t_dense / t``, medians of the same 3 interleaved turns
                        (:func:`~prunekit.analysis.speedup`); its spread is that over seeds

What is timed is the model as ``materialize`` makes it: ``"masks"`` runs the baked dense
weights (zeros still multiplied, so ~1x), ``"shrink"`` removes every all-zero channel /
head group physically (:func:`prunekit.shrink` with ``ratio=None``; filter / channel
methods), ``"sparse"`` runs each layer in its fastest format
(:func:`prunekit.sparse.convert` with ``format="auto"`` at the example's batch size).

:meth:`SweepReport.summary` gives mean and sample std (ddof 1; 0 for one seed) over seeds.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

from rich.table import Table
from torch import nn

from prunekit.allocation import check_sparsity
from prunekit.analysis.profile import profile
from prunekit.analysis.sensitivity import Evaluate, _score
from prunekit.analysis.timing import MIN_RUN_TIME, measure_latencies, speedup
from prunekit.errors import InvalidSparsityError, SweepError
from prunekit.inputs import Inputs, batch_size
from prunekit.masks import bake
from prunekit.pruning import prune
from prunekit.sparse.convert import convert
from prunekit.spec import SPEC_FIELDS, PruneSpec, checked
from prunekit.structured.shrink import shrink
from prunekit.tables import TableReport, progress_bar

RANDOM = "random"
MATERIALIZE = ("masks", "shrink", "sparse")
DENSE = "dense"
BuildAndTrain = Callable[[int], nn.Module]
Finetune = Callable[[nn.Module, int], object]
_FIXED = {"model", "sparsity", "seed"}  # prune arguments the sweep sets itself


@dataclass(frozen=True)
class SweepPoint:
    """One (method, sparsity, seed); the dense point has method ``"dense"``, sparsity 0.

    ``dense_latency_ms`` is the dense model's latency timed in turns with this one (its
    own for the dense point), both medians of the same interleaved turns
    (:func:`~prunekit.analysis.speedup`); ``measured_speedup = dense_latency_ms /
    latency_ms``, its spread that over seeds (:meth:`SweepReport.summary`).
    """

    method: str
    sparsity: float
    seed: int
    metric: float
    achieved_sparsity: float
    params: int
    nonzero: int
    macs: int
    effective_macs: float
    latency_ms: float
    dense_latency_ms: float
    compression: float
    theoretical_speedup: float
    measured_speedup: float


_STATS = (
    "metric",
    "achieved_sparsity",
    "compression",
    "effective_macs",
    "latency_ms",
    "theoretical_speedup",
    "measured_speedup",
)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class SweepReport(TableReport):
    """Every :class:`SweepPoint` of a :func:`sweep`, and their summaries over seeds."""

    points: list[SweepPoint]

    def _groups(self) -> dict[tuple[str, float], list[SweepPoint]]:
        groups: dict[tuple[str, float], list[SweepPoint]] = {}
        for p in self.points:
            groups.setdefault((p.method, p.sparsity), []).append(p)
        return groups

    def summary(self) -> list[dict[str, object]]:
        """One row per (method, sparsity): ``seeds``, ``macs`` and ``<stat>_mean`` /
        ``<stat>_std`` of metric, achieved sparsity, compression, effective MACs, latency
        and both speed-ups (plain ints, floats and strings for CSV / JSON)."""
        rows = []
        for (method, sparsity), group in self._groups().items():
            row: dict[str, object] = {"method": method, "sparsity": sparsity}
            row |= {"seeds": len(group), "macs": group[0].macs}
            for stat in _STATS:
                mean, std = _mean_std([getattr(p, stat) for p in group])
                row |= {f"{stat}_mean": mean, f"{stat}_std": std}
            rows.append(row)
        return rows

    def to_rows(self, per_seed: bool = False) -> list[dict[str, object]]:
        """:meth:`summary`, or with ``per_seed`` every point as a plain dict."""
        return [asdict(p) for p in self.points] if per_seed else self.summary()

    def curves(self) -> dict[str, dict[float, list[float]]]:
        """``{method: {sparsity: [metric per seed]}}`` for
        :func:`~prunekit.analysis.plots.plot_accuracy_vs_sparsity`; every curve starts at
        the dense metrics (sparsity 0)."""
        groups = self._groups()
        dense = [p.metric for p in groups[(DENSE, 0.0)]]
        curves: dict[str, dict[float, list[float]]] = {}
        for (method, sparsity), group in groups.items():
            if method != DENSE:
                curve = curves.setdefault(method, {0.0: dense})
                curve[sparsity] = [p.metric for p in group]
        return curves

    def latency_vs_macs(self) -> dict[str, list[tuple[float, float, float]]]:
        """``{method: [(mean effective MACs, mean latency ms, std latency ms), ...]}`` over
        seeds, dense point first, for :func:`~prunekit.analysis.plots.plot_latency_vs_macs`
        (error bars)."""
        xy = {
            (r["method"], r["sparsity"]): (
                r["effective_macs_mean"],
                r["latency_ms_mean"],
                r["latency_ms_std"],
            )
            for r in self.summary()
        }
        dense = xy.pop((DENSE, 0.0))
        series: dict[str, list[tuple[float, float, float]]] = {}
        for (method, _), point in xy.items():
            series.setdefault(str(method), [dense]).append(point)
        return series

    def table(self) -> Table:
        """Mean +- std over seeds per (method, sparsity)."""
        table = Table(title="prunekit sweep (mean +- std over seeds)")
        headers = ("method", "sparsity", "seeds", "metric", "achieved", "compression")
        for h in (*headers, "theor. speed-up", "meas. speed-up", "latency ms"):
            table.add_column(h, justify="left" if h == "method" else "right")
        for r in self.summary():
            pm = {s: f"{r[f'{s}_mean']:.3f} ± {r[f'{s}_std']:.3f}" for s in _STATS}
            table.add_row(
                str(r["method"]),
                f"{r['sparsity']:.0%}",
                str(r["seeds"]),
                pm["metric"],
                f"{r['achieved_sparsity_mean']:.1%}",
                f"{r['compression_mean']:.2f}x",
                f"{r['theoretical_speedup_mean']:.2f}x",
                pm["measured_speedup"],
                pm["latency_ms"],
            )
        return table


class Method(NamedTuple):
    """One compared method: its typed settings and its calibration data."""

    spec: PruneSpec
    data: object


def _check_methods(methods: Mapping[str, Mapping[str, object]]) -> dict[str, Method]:
    """The methods plus the random baseline, each a :class:`~prunekit.PruneSpec` built (so
    checked) before any training."""
    allowed = ({*SPEC_FIELDS, "data"}) - _FIXED
    checked = {}
    for name, kwargs in methods.items():
        unknown = set(kwargs) - allowed
        if name in (DENSE, RANDOM) or unknown:
            raise SweepError(
                f"method {name!r}: the names 'dense' and 'random' are reserved and the keyword "
                f"arguments must be pk.prune's (not {sorted(_FIXED)}); got unknown "
                f"{sorted(unknown)}. Fix: pass e.g. {{'global': {{'scope': 'global'}}}}."
            )
        settings = {k: v for k, v in kwargs.items() if k != "data"}
        checked[name] = Method(PruneSpec(**settings), kwargs.get("data"))
    return {**checked, RANDOM: Method(PruneSpec(criterion=RANDOM, **_ends(checked)), None)}


def _ends(methods: Mapping[str, Method]) -> dict[str, bool]:
    """The random baseline's include flags: each set when any method sets it, so the
    baseline prunes every layer some method prunes, whatever the methods' order."""
    return {flag: any(getattr(m.spec, flag) for m in methods.values())
            for flag in ("include_output", "include_embeddings")}  # fmt: skip


def _check_grid(sparsities: Sequence[float], seeds: Sequence[int]) -> tuple[float, ...]:
    if not seeds or not sparsities:
        raise SweepError("a sweep needs at least one seed and one sparsity; Fix: seeds=(0, 1)")
    grid = sorted({check_sparsity(s, "sparsities") for s in sparsities})
    if grid[0] == 0:
        raise SweepError("sparsity 0 is the dense point, always measured; Fix: drop it")
    return tuple(grid)


class _Timing(NamedTuple):
    example_inputs: Inputs
    min_run_time: float
    materialize: str


def _materialized(model: nn.Module, timing: _Timing) -> nn.Module:
    """The baked ``model`` as ``timing.materialize`` runs it (module docstring)."""
    bake(model)
    if timing.materialize == "shrink":
        with contextlib.suppress(InvalidSparsityError):  # no all-zero group: timed as is
            shrink(model, timing.example_inputs, ratio=None)
    elif timing.materialize == "sparse":
        convert(model, "auto", batch_size=batch_size(timing.example_inputs))
    return model


def _point(
    key: tuple[str, float, int],
    metric: float,
    model: nn.Module,
    dense: tuple[SweepPoint, nn.Module] | None,
    timing: _Timing,
) -> SweepPoint:
    """Profile the baked ``model`` (method, sparsity, seed ``key``) and time it as
    materialised, interleaved with the dense ``(point, model)`` (None: this is it)."""
    total = profile(bake(model), timing.example_inputs, latency=False).total
    if dense is None:
        (latency,) = measure_latencies([model], timing.example_inputs, timing.min_run_time)
        ref_latency, ref_params, ref_macs = latency, total.params, total.macs
    else:
        with warnings.catch_warnings():  # the spread over seeds is the sweep's error bar
            warnings.simplefilter("ignore", UserWarning)
            timed = speedup(dense[1], _materialized(model, timing), timing.example_inputs,
                            repeats=3, min_run_time=timing.min_run_time)  # fmt: skip
        ref_latency, latency = timed.latency_a_s, timed.latency_b_s
        ref_params, ref_macs = dense[0].params, dense[0].macs
    return SweepPoint(
        *key,
        metric=metric,
        achieved_sparsity=total.sparsity,
        params=total.params,
        nonzero=total.nonzero,
        macs=total.macs,
        effective_macs=total.effective_macs,
        latency_ms=latency * 1e3,
        dense_latency_ms=ref_latency * 1e3,
        compression=ref_params / max(total.nonzero, 1),
        theoretical_speedup=ref_macs / max(total.effective_macs, 1e-12),
        measured_speedup=ref_latency / latency,
    )


def sweep(
    build_and_train: BuildAndTrain,
    evaluate: Evaluate,
    *,
    methods: Mapping[str, Mapping[str, object]],
    sparsities: Sequence[float] = (0.5, 0.8, 0.9),
    seeds: Sequence[int] = (0, 1, 2),
    example_inputs: Inputs,
    finetune: Finetune | None = None,
    min_run_time: float = 0.05,
    materialize: str = "masks",
    progress: bool = True,
) -> SweepReport:
    """Measure every method at every sparsity on a model trained with every seed.

    Args:
        build_and_train: ``f(seed) -> trained model``.
        evaluate: ``f(model) -> float``, higher is better (accuracy, minus loss...).
        methods: ``{name: pk.prune keyword arguments}`` (no ``sparsity`` / ``seed``), e.g.
            ``{"global": {"scope": "global"}, "l2-row": {"granularity": "row",
            "criterion": "l2"}}``; the baseline ``"random"`` is added (the output layer /
            embeddings included when any method includes them).
        sparsities: target sparsities in (0, 1); the dense point (0) is always measured.
        seeds: one trained model per seed; each pruning uses that seed too.
        example_inputs: the input the MACs and the latency are measured on.
        finetune: ``f(pruned model, seed)`` run after pruning, before evaluating.
        min_run_time: seconds of timing per latency measurement.
        materialize: ``"masks"``, ``"shrink"`` or ``"sparse"``: what the timed pruned
            model is (module docstring).
        progress: show a rich progress bar.

    Returns:
        A :class:`SweepReport` (see the module docstring for every quantity).

    Raises:
        SweepError: no seeds or sparsities, sparsity 0, an unknown keyword argument, a
            reserved method name or an unknown ``materialize``; PruningError for a
            ``min_run_time`` not in (0, 3600] seconds; InvalidSparsityError /
            UnknownChoiceError for a bad sparsity, criterion or granularity. All are raised
            before any training.
    """
    grid = _check_grid(sparsities, seeds)
    all_methods = _check_methods(methods)
    checked("sweep", "min_run_time", min_run_time, MIN_RUN_TIME)
    points: list[SweepPoint] = []
    if materialize not in MATERIALIZE:
        raise SweepError(
            f"materialize={materialize!r} is not one of {MATERIALIZE}; Fix: 'sparse' times "
            "sparse kernels, 'shrink' physically removed channels, 'masks' the dense zeros."
        )
    timing = _Timing(example_inputs, min_run_time, materialize)
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("sweep", total=len(seeds) * (1 + len(all_methods) * len(grid)))
        for seed in seeds:
            bar.update(task, description=f"seed {seed}: training")
            trained = build_and_train(seed)
            metric = _score(evaluate, trained)
            # Each (method, sparsity) prunes its own copy of the trained model (an
            # experiment, not validation).
            dense_model = bake(copy.deepcopy(trained))
            dense = _point((DENSE, 0.0, seed), metric, dense_model, None, timing)
            points.append(dense)
            bar.advance(task)
            for (method, how), sparsity in ((m, s) for m in all_methods.items() for s in grid):
                bar.update(task, description=f"seed {seed}: {method} @ {sparsity:.0%}")
                model = copy.deepcopy(trained)
                prune(model, sparsity, spec=how.spec.replace(seed=seed), data=how.data)
                if finetune is not None:
                    finetune(model, seed)
                metric = _score(evaluate, model)
                key = (method, sparsity, seed)
                points.append(_point(key, metric, model, (dense, dense_model), timing))
                bar.advance(task)
    return SweepReport(points)
