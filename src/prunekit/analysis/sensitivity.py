"""Layer-wise sensitivity analysis and the per-layer allocation it implies.

Method (Han et al. 2015, "Learning both Weights and Connections for Efficient Neural
Networks", Fig. 6; Li et al. 2017, "Pruning Filters for Efficient ConvNets", Sec. 3.4):
prune ONE layer at a time to each sparsity ``s`` of a grid, leave every other layer dense,
and measure the model's metric ``m_l(s)``. The drop ``d_l(s) = m_dense - m_l(s)`` says how
much layer ``l`` tolerates; tolerant layers can take more sparsity than fragile ones.

The chapter (3.2.2) names sensitivity-driven allocation without a procedure; prunekit
derives it with :meth:`SensitivityReport.allocation` (a greedy rising drop threshold,
documented there). Every pruned point is computed with :func:`prunekit.prune` on a private
copy of the model, so the model passed in is never modified.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.table import Table
from torch import nn

from prunekit import criteria as criteria_mod
from prunekit import granularity as granularity_mod
from prunekit.allocation import check_sparsity
from prunekit.criteria import Criterion
from prunekit.criteria.base import Batches, LossFn
from prunekit.errors import InvalidSparsityError, PruningError
from prunekit.granularity import NM, Granularity
from prunekit.layers import Selector
from prunekit.pruning import _resolve_layers, prune
from prunekit.tables import TableReport, progress_bar

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
Evaluate = Callable[[nn.Module], float]


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's metric at each sparsity of the report's grid (that layer pruned alone)."""

    name: str
    kind: str
    numel: int
    metrics: tuple[float, ...]


@dataclass(frozen=True)
class SensitivityReport(TableReport):
    """The metric per layer per sparsity; see :func:`sensitivity`. ``include_output`` /
    ``include_embeddings``: the flags it was measured with (a prune of its allocation
    passes the same)."""

    granularity: str
    criterion: str
    dense: float
    sparsities: tuple[float, ...]
    layers: list[LayerSensitivity]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    include_output: bool = False
    include_embeddings: bool = False

    def drops(self, name: str) -> tuple[float, ...]:
        """``dense - metric`` of layer ``name`` at each sparsity (positive = worse)."""
        layer = next((r for r in self.layers if r.name == name), None)
        if layer is None:
            raise KeyError(name)
        return tuple(self.dense - m for m in layer.metrics)

    def ranking(self) -> list[str]:
        """Layer names from most to least tolerant: ascending mean drop over the grid
        (the area under the drop curve), ties broken by name."""
        return sorted(
            (r.name for r in self.layers),
            key=lambda n: (sum(self.drops(n)) / len(self.sparsities), n),
        )

    def allocation(self, target: float, budget: float) -> dict[str, float]:
        """Per-layer sparsities with size-weighted mean ``target``, each layer's drop within
        ``budget`` (in metric units, e.g. 0.01 = one accuracy point).

        Greedy rising threshold: every layer starts dense (its curve starts at
        ``(0, d=0)``) and moves up its measured grid one point at a time. Each step takes the
        layer whose NEXT grid point has the smallest drop (the most tolerant one; ties go
        to the earlier layer in :meth:`ranking`); a layer stops for good at the first grid
        point whose drop exceeds ``budget``. As soon as a step would pass the target, that
        layer's sparsity is interpolated linearly between its two grid points so that
        ``sum(s_l * n_l) / sum(n_l) == target`` exactly (``n_l``: weights of layer ``l``).
        Since each layer stays below its first point over budget and the last step is a
        linear interpolation, no layer's (interpolated) drop exceeds ``budget``.

        The result is a ``{layer: sparsity}`` dict for ``pk.prune(model, allocation=...,
        layers=list(alloc), granularity=..., include_output=report.include_output,
        include_embeddings=report.include_embeddings)`` (without the flags the analysis
        used, an output layer or embedding it measured stays dense). Structured
        granularities round each layer to whole groups, so the achieved total can differ
        from ``target`` by up to one group per layer.

        Raises:
            InvalidSparsityError: ``target`` not in [0, 1).
            PruningError: a negative or non-finite budget, or a target no allocation
                within the budget reaches (the message gives the most that can be reached).
        """
        target = check_sparsity(target, "target")
        if isinstance(budget, bool) or not isinstance(budget, int | float):
            raise PruningError(f"budget={budget!r} must be a number (a metric drop, e.g. 0.01)")
        if not math.isfinite(budget) or budget < 0:
            raise PruningError(
                f"budget={budget!r} must be a finite drop >= 0 in metric units; "
                "Fix: pass e.g. 0.01 for one accuracy point."
            )
        order = {name: i for i, name in enumerate(self.ranking())}
        size = {r.name: r.numel for r in self.layers}
        grid = (0.0, *self.sparsities)
        curve = {r.name: (0.0, *self.drops(r.name)) for r in self.layers}
        step = dict.fromkeys(size, 0)  # index into `grid` each layer has reached
        needed = target * sum(size.values())
        while needed > 1e-9 * sum(size.values()):
            open_ = [n for n in size if step[n] + 1 < len(grid) and curve[n][step[n] + 1] <= budget]
            if not open_:
                reached = sum(grid[step[n]] * size[n] for n in size) / sum(size.values())
                raise PruningError(
                    f"target sparsity {target:.2%} cannot be met within budget {budget:g}: "
                    f"with every layer at its last measured sparsity whose drop is within "
                    f"the budget, the overall sparsity is {reached:.2%}. Fix: lower target to "
                    f"<= {reached:.4f}, raise budget, or measure a grid reaching higher "
                    "sparsities."
                )
            name = min(open_, key=lambda n: (curve[n][step[n] + 1], order[n]))
            lo, hi = grid[step[name]], grid[step[name] + 1]
            gain = (hi - lo) * size[name]
            if gain >= needed:
                return {
                    n: (lo + needed / size[n] if n == name else grid[step[n]]) for n in self.order
                }
            needed -= gain
            step[name] += 1
        return {n: grid[step[n]] for n in self.order}

    @property
    def order(self) -> list[str]:
        """Layer names in model order."""
        return [r.name for r in self.layers]

    def to_dict(self) -> dict[str, object]:
        """Plain, JSON-serialisable numbers."""
        return {
            "granularity": self.granularity,
            "criterion": self.criterion,
            "dense": self.dense,
            "sparsities": list(self.sparsities),
            "layers": {r.name: list(r.metrics) for r in self.layers},
            "numel": {r.name: r.numel for r in self.layers},
        }

    def table(self) -> Table:
        table = Table(
            title=f"sensitivity: {self.granularity} / {self.criterion}, dense {self.dense:.4g}",
            caption="metric with only that layer pruned to the column's sparsity",
        )
        table.add_column("layer")
        table.add_column("type")
        table.add_column("weights", justify="right")
        for s in self.sparsities:
            table.add_column(f"{s:.0%}", justify="right")
        for r in self.layers:
            table.add_row(r.name, r.kind, f"{r.numel:,}", *(f"{m:.4g}" for m in r.metrics))
        for name, reason in self.skipped:
            table.add_row(name, "skipped", "", reason)
        return table


@contextmanager
def _swapped(model: nn.Module, name: str, module: nn.Module) -> Iterator[None]:
    """Put ``module`` at ``name`` in ``model`` for the duration, then the original back."""
    if not name:
        raise PruningError("sensitivity needs a model that contains its layers, not a bare layer")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    original = getattr(parent, child)
    setattr(parent, child, module)
    try:
        yield
    finally:
        setattr(parent, child, original)


def _grid(sparsities: Sequence[float] | None, gran: Granularity) -> tuple[float, ...]:
    if sparsities is None:
        return (gran.sparsity,) if isinstance(gran, NM) else DEFAULT_SPARSITIES
    grid = sorted({check_sparsity(s, "sparsities") for s in sparsities})
    if not grid:
        raise InvalidSparsityError("sparsities is empty; Fix: pass e.g. (0.25, 0.5, 0.75)")
    if isinstance(gran, NM) and grid != [gran.sparsity]:
        raise InvalidSparsityError(
            f"granularity {gran.name} fixes sparsity at {gran.sparsity:g}, got {grid}; "
            "Fix: omit sparsities."
        )
    return tuple(grid)


def _score(evaluate: Evaluate, model: nn.Module) -> float:
    value = evaluate(model)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PruningError(
            f"evaluate(model) returned {value!r}; it must return a finite float (higher is "
            "better). Fix: return e.g. accuracy, or minus the loss."
        )
    return float(value)


def sensitivity(
    model: nn.Module,
    evaluate: Evaluate,
    *,
    sparsities: Sequence[float] | None = None,
    granularity: str | Granularity = "element",
    criterion: str | Criterion = "magnitude",
    layers: Selector = None,
    exclude: Selector = None,
    data: Batches | None = None,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    include_output: bool = False,
    include_embeddings: bool = False,
) -> SensitivityReport:
    """Prune each layer alone at each sparsity and measure ``evaluate(model)``.

    For layer ``l`` and sparsity ``s``: ``m_l(s) = evaluate(model with only l pruned to s)``,
    pruning by :func:`prunekit.prune` with the given granularity and criterion (Han et al.
    2015; Li et al. 2017). Each point starts from the dense layer (no compounding), on a
    private copy of ``model``: the model passed in is left exactly as it was.

    Args:
        model: the trained model.
        evaluate: ``f(model) -> float``, higher is better (accuracy, minus loss...).
        sparsities: the grid; default 0.1, 0.2, ..., 0.9 (for N:M, its fixed sparsity).
        granularity / criterion / layers / exclude / data / loss_fn: as in
            :func:`prunekit.prune`. Layers the granularity cannot split are skipped (and
            listed) unless named in ``layers``.
        include_output / include_embeddings: as in :func:`prunekit.prune`: the output
            layer and the embeddings are not analysed unless included.
        progress: show a rich progress bar over (layer, sparsity).

    Returns:
        A :class:`SensitivityReport`; ``report.allocation(target, budget)`` turns it into
        a per-layer ``allocation=`` for :func:`prunekit.prune`.

    Example:
        >>> report = pk.analysis.sensitivity(model, lambda m: evaluate(m, x, y))
        >>> pk.prune(model, allocation=report.allocation(0.8, budget=0.01))
    """
    gran = granularity_mod.parse(granularity)
    crit = criteria_mod.get(criterion)
    grid = _grid(sparsities, gran)
    # The experiment prunes every layer in turn; the caller's model is never touched.
    work = copy.deepcopy(model)
    ends = dict(include_output=include_output, include_embeddings=include_embeddings)
    usable, skipped = _resolve_layers(work, layers, exclude, gran, **ends)
    dense = _score(evaluate, work)
    results = []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("sensitivity", total=len(usable) * len(grid))
        for layer in usable:
            metrics = []
            for s in grid:
                bar.update(task, description=f"sensitivity {layer.name} @ {s:.0%}")
                with _swapped(work, layer.name, copy.deepcopy(layer.module)):  # one layer
                    prune(
                        work,
                        None if isinstance(gran, NM) else s,
                        granularity=gran,
                        criterion=crit,
                        layers=lambda n, m, target=layer.name: n == target,
                        data=data,
                        loss_fn=loss_fn,
                        **ends,
                    )
                    metrics.append(_score(evaluate, work))
                bar.advance(task)
            results.append(
                LayerSensitivity(layer.name, layer.kind, layer.weight.numel(), tuple(metrics))
            )
    return SensitivityReport(gran.name, repr(crit), dense, grid, results, skipped, **ends)
