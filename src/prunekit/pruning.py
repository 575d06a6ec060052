"""``pk.prune``: masks from granularity x criterion x scope, in one validated call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from rich.table import Table
from torch import Tensor, nn

from prunekit import bits
from prunekit import criteria as criteria_mod
from prunekit import granularity as granularity_mod
from prunekit.allocation import Allocation, allocate, check_sparsity
from prunekit.criteria import Criterion
from prunekit.criteria.base import Batches, LossFn
from prunekit.errors import (
    IncompatibleLayerError,
    InvalidSparsityError,
    NoLayersError,
    PruningError,
)
from prunekit.granularity import NM, Granularity
from prunekit.layers import (
    Layer,
    Selector,
    check_weight,
    from_canonical,
    require_unique_modules,
    select_layers,
)
from prunekit.masks import apply_packed, kept_fraction
from prunekit.selection import LayerPlan, element_mask, select_pool
from prunekit.tables import TableReport

SCOPES = ["local", "global"]


@dataclass(frozen=True)
class LayerResult:
    """Where one layer started and ended."""

    name: str
    kind: str
    shape: tuple[int, ...]
    numel: int
    target: float | None
    before: float
    after: float


@dataclass(frozen=True)
class PruneReport(TableReport):
    """What :func:`prune` did: settings, per-layer sparsity before/after, skipped layers."""

    granularity: str
    criterion: str
    scope: str
    target: float | None
    layers: list[LayerResult]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over the pruned layers."""
        return sum(r.after * r.numel for r in self.layers) / max(self.numel, 1)

    def table(self) -> Table:
        title = (
            f"prune: {self.granularity} / {self.criterion} / {self.scope}, "
            f"target {'-' if self.target is None else f'{self.target:.2%}'}, "
            f"achieved {self.sparsity:.2%}"
        )
        table = Table(title=title)
        for col in ("layer", "type", "shape", "weights", "target", "before", "after"):
            table.add_column(col, justify="left" if col in ("layer", "type") else "right")
        for r in self.layers:
            target = "-" if r.target is None else f"{r.target:.2%}"
            table.add_row(
                r.name,
                r.kind,
                "x".join(map(str, r.shape)),
                f"{r.numel:,}",
                target,
                f"{r.before:.2%}",
                f"{r.after:.2%}",
            )
        for name, reason in self.skipped:
            table.add_row(name, "skipped", "", "", "", "", reason)
        return table


def _resolve_layers(
    model: nn.Module, layers: Selector, exclude: Selector, granularity: Granularity
) -> tuple[list[Layer], list[tuple[str, str]]]:
    chosen = select_layers(model, layers, exclude)
    require_unique_modules(chosen)
    usable, skipped = [], []
    for layer in chosen:
        reason = granularity.incompatibility(layer)
        if reason is None:
            usable.append(layer)
        elif layers is not None:
            raise IncompatibleLayerError(f"layer {layer.name!r}: {reason}")
        else:
            skipped.append((layer.name, reason))
    if not usable:
        raise NoLayersError(
            f"granularity {granularity.name!r} applies to none of the selected layers: "
            + "; ".join(f"{n}: {r}" for n, r in skipped)
        )
    for layer in usable:
        check_weight(layer)
    return usable, skipped


def _layer_sparsity(layer: Layer) -> float:
    return 1.0 - kept_fraction(layer.module)


def _nm_masks(plans: list[LayerPlan], granularity: NM, criterion: Criterion) -> list[Tensor]:
    """Packed storage-layout masks keeping the best N of every M inputs of each layer."""
    masks = []
    for plan in plans:
        shape = plan.grouping.shape
        keeps = [
            granularity.keep(scores.view(r1 - r0, *shape[1:]))
            for (r0, r1), (scores, _) in zip(plan.row_chunks(), plan.scores(criterion), strict=True)
        ]
        keep = from_canonical(plan.layer.module, torch.cat(keeps))
        masks.append(bits.pack(keep.contiguous()))
    return masks


def prune(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    granularity: str | Granularity = "element",
    criterion: str | Criterion = "magnitude",
    scope: str = "local",
    allocation: Allocation = "uniform",
    layers: Selector = None,
    exclude: Selector = None,
    data: Batches | None = None,
    loss_fn: LossFn | None = None,
    min_keep: int = 1,
    seed: int = 0,
) -> PruneReport:
    """Mask the lowest-scoring groups of weights so that ``sparsity`` of them are zero.

    Args:
        model: any ``nn.Module``; its Linear, Conv1d/2d/3d, ConvTranspose2d, Embedding and
            transformers ``Conv1D`` layers are prunable.
        sparsity: fraction in [0, 1) of the selected weights to be zero afterwards,
            counting weights already masked (so masks compose: 0.5 then 0.9 gives 0.9).
            Not needed for N:M (fixed at ``1 - N/M``).
        granularity: ``"element"``, ``"2:4"`` (any ``"N:M"``), ``"row"``, ``"column"``,
            ``"kernel"``, ``"filter"``, ``"channel"``, ``"block:AxB"`` or an instance.
        criterion: ``"magnitude"``, ``"l1"``, ``"l2"``, ``"gradient"``, ``"taylor"``,
            ``"random"``, a :class:`~prunekit.criteria.Criterion` or ``f(weight) -> scores``.
        scope: ``"local"`` (each layer to its allocated sparsity) or ``"global"`` (one
            ranking over all selected layers; layers end at different sparsities).
        allocation: local scope only: ``"uniform"``, ``"erk"`` or ``{layer: sparsity}``.
        layers / exclude: selectors (names, glob patterns, types, or a predicate). With
            ``layers=None``, layers the granularity cannot split are skipped and reported.
        data / loss_fn: calibration batches ``[(x, y), ...]`` for data-driven criteria.
        min_keep: groups each layer keeps at least (0 lets global scope empty a layer).
        seed: seeds the random criterion and the sampling of large pools.

    Returns:
        A :class:`PruneReport`. On any error the model is left exactly as it was.

    Example:
        >>> report = pk.prune(model, 0.9, scope="global")
    """
    gran = granularity_mod.parse(granularity)
    crit = criteria_mod.get(criterion)
    if scope not in SCOPES:
        raise PruningError(f"unknown scope {scope!r}; valid scope values are: {', '.join(SCOPES)}")
    if isinstance(gran, NM):
        if sparsity is not None and abs(check_sparsity(sparsity) - gran.sparsity) > 1e-9:
            raise InvalidSparsityError(
                f"granularity {gran.name} fixes sparsity at {gran.sparsity:g}, got {sparsity!r}; "
                "Fix: omit sparsity (or pass the matching value)."
            )
    elif sparsity is not None:
        check_sparsity(sparsity)
    elif not isinstance(allocation, Mapping):
        raise InvalidSparsityError(f"granularity {gran.name!r} needs sparsity=<fraction in [0, 1)>")
    if scope == "global" and allocation != "uniform":
        raise PruningError(
            "global scope ranks all layers together, so it takes no allocation; "
            "Fix: use scope='local' with an allocation, or drop the allocation."
        )
    if not isinstance(min_keep, int) or min_keep < 0:
        raise PruningError(f"min_keep={min_keep!r} must be a non-negative int")
    usable, skipped = _resolve_layers(model, layers, exclude, gran)
    targets = (
        None
        if isinstance(gran, NM) or scope == "global"
        else allocate(usable, sparsity, allocation)
    )
    groupings = {ly.name: gran.grouping(tuple(ly.canonical.shape)) for ly in usable}
    stats = crit.prepare(model, usable, groupings, data, loss_fn) if crit.requires_data else {}
    plans = [LayerPlan(ly, gran, groupings[ly.name], stats.get(ly.name), seed) for ly in usable]
    before = [_layer_sparsity(ly) for ly in usable]

    if isinstance(gran, NM):
        masks = _nm_masks(plans, gran, crit)
    else:
        if scope == "global":
            n_prune = round(sparsity * sum(p.numel for p in plans))
            packed = select_pool(plans, crit, n_prune, min_keep, seed)
        else:
            packed = [
                select_pool([p], crit, round(targets[p.layer.name] * p.numel), min_keep, seed)[0]
                for p in plans
            ]
        masks = [element_mask(p, m) for p, m in zip(plans, packed, strict=True)]

    for plan, mask in zip(plans, masks, strict=True):
        apply_packed(plan.layer.module, mask)
    results = [
        LayerResult(
            ly.name,
            ly.kind,
            tuple(ly.weight.shape),
            ly.weight.numel(),
            gran.sparsity
            if isinstance(gran, NM)
            else (None if targets is None else targets[ly.name]),
            b,
            _layer_sparsity(ly),
        )
        for ly, b in zip(usable, before, strict=True)
    ]
    target = gran.sparsity if isinstance(gran, NM) else sparsity
    return PruneReport(gran.name, repr(crit), scope, target, results, skipped)
