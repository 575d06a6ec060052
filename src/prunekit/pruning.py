"""``pk.prune``: masks from granularity x criterion x scope, in one validated call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.table import Table
from torch import Tensor, nn

from prunekit import bits, coverage
from prunekit.allocation import Allocation, allocate, check_sparsity
from prunekit.criteria import Criterion
from prunekit.criteria.base import Batches
from prunekit.criteria.gradient import GradientStatistic
from prunekit.criteria.init import SynFlow
from prunekit.criteria.units import LayerUnits
from prunekit.errors import (
    IncompatibleLayerError,
    InvalidSparsityError,
    MissingDataError,
    NoLayersError,
)
from prunekit.granularity import NM, Granularity, Grouping
from prunekit.inputs import Calibration
from prunekit.layers import (
    Layer,
    Selector,
    check_weight,
    from_canonical,
    is_prunable,
    layer_incompatibility,
    require_unique_modules,
    skipped_tensors,
)
from prunekit.masks import apply_packed, kept_fraction, tie_masks
from prunekit.selection import LayerPlan, element_mask, select_pool
from prunekit.spec import PruneSpec, spec_of
from prunekit.tables import TableReport


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
    """What :func:`prune` did: settings, per-layer sparsity before/after, and the
    ``skipped`` layers with the reason (kept dense by default, see :mod:`prunekit.coverage`,
    or not prunable at this granularity), which :attr:`sparsity` does not count."""

    granularity: str
    criterion: str
    scope: str
    target: float | None
    layers: list[LayerResult]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    skipped_numel: int = 0

    @property
    def numel(self) -> int:
        """Weights of the pruned layers: what :attr:`sparsity` is a fraction of."""
        return sum(r.numel for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over the pruned layers (``numel`` weights; the ``skipped``
        layers and tensors, ``skipped_numel`` weights, are not counted)."""
        return sum(r.after * r.numel for r in self.layers) / max(self.numel, 1)

    def summary(self) -> str:
        """``achieved 50.00% of 12,345 weights in 14 layers; 3 skipped (1,024 weights)``."""
        skipped = f"; {len(self.skipped)} skipped ({self.skipped_numel:,} weights)"
        return (
            f"achieved {self.sparsity:.2%} of {self.numel:,} weights in {len(self.layers)} "
            f"layer{'' if len(self.layers) == 1 else 's'}{skipped if self.skipped else ''}"
        )

    def table(self) -> Table:
        title = (
            f"prune: {self.granularity} / {self.criterion} / {self.scope}, "
            f"target {'-' if self.target is None else f'{self.target:.2%}'}, {self.summary()}"
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
        table.caption, table.caption_justify = coverage.not_counted(self.skipped), "left"
        return table


def _resolve_layers(
    model: nn.Module,
    layers: Selector,
    exclude: Selector,
    granularity: Granularity,
    *,
    include_output: bool = False,
    include_embeddings: bool = False,
) -> tuple[list[Layer], list[tuple[str, str]]]:
    """The layers a prune with these settings covers, and the skipped ones with the reason
    (kept dense by default, or not prunable at this granularity)."""
    spec = PruneSpec(
        granularity=granularity,
        layers=layers,
        exclude=exclude,
        include_output=include_output,
        include_embeddings=include_embeddings,
    )
    return _usable(model, spec)[:2]


def _usable(
    model: nn.Module, spec: PruneSpec
) -> tuple[list[Layer], list[tuple[str, str]], dict[str, coverage.Dense]]:
    """:func:`_resolve_layers` for ``spec``, and the layers kept dense by default."""
    chosen, dense = coverage.select(
        model,
        spec.layers,
        spec.exclude,
        include_output=spec.include_output,
        include_embeddings=spec.include_embeddings,
    )
    require_unique_modules(chosen)
    usable, skipped = [], [(name, str(why)) for name, why in dense.items()]
    for layer in chosen:
        reason = layer_incompatibility(layer) or spec.gran.incompatibility(layer)
        if reason is None:
            usable.append(layer)
        elif spec.layers is not None:
            raise IncompatibleLayerError(f"layer {layer.name!r}: {reason}")
        else:
            skipped.append((layer.name, reason))
    if not usable:
        raise NoLayersError(
            f"none of the selected layers can be pruned (granularity {spec.gran.name!r}): "
            + "; ".join(f"{n}: {r}" for n, r in skipped)
        )
    for layer in usable:
        check_weight(layer)
    return usable, skipped, dense


def _skipped(
    model: nn.Module, spec: PruneSpec, skipped: list[tuple[str, str]]
) -> tuple[list[tuple[str, str]], int]:
    """The skipped layers plus, when every layer was asked for (``layers=None``), the
    weight-like tensors no prunable layer holds (fused MoE experts...); and their size."""
    weights = [getattr(model.get_submodule(name), "weight", None) for name, _ in skipped]
    unique = {id(w): w for w in weights if isinstance(w, Tensor)}  # a tied weight once
    numel = sum(w.numel() for w in unique.values())
    if spec.layers is not None:
        return skipped, numel
    covered = [p for m in model.modules() if is_prunable(m) for p in m.parameters()]
    extra = skipped_tensors(model, covered)
    return skipped + [(n, r) for n, r, _ in extra], numel + sum(e[2] for e in extra)


_NEEDS_GRADIENTS = (GradientStatistic, SynFlow)


def _check_criterion(crit: Criterion, layer: Layer) -> None:
    reason = crit.incompatibility(layer)
    if reason is None and isinstance(crit, _NEEDS_GRADIENTS) and not layer.weight.requires_grad:
        reason = (
            f"its weight is frozen (requires_grad=False) and criterion {crit.name!r} needs its "
            "gradient; Fix: unfreeze it for the scoring (weight.requires_grad_(True)), exclude "
            "the layer, or use a data-free criterion such as 'magnitude'"
        )
    if reason is not None:
        raise IncompatibleLayerError(f"layer {layer.name!r} ({layer.kind}): {reason}")


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


@dataclass(frozen=True)
class PrunePlan:
    """What :func:`apply` will do, resolved and validated by :func:`plan` (nothing run).

    ``layers`` are the layers that will be pruned, ``skipped`` the ones it cannot prune
    (with the reason; with ``layers=None`` also the weight tensors no prunable layer holds,
    such as fused MoE experts) holding ``skipped_numel`` weights, ``targets`` the
    per-layer sparsity under local scope (None for global scope and N:M), ``groupings``
    each layer's full grouping.
    """

    model: nn.Module
    spec: PruneSpec
    sparsity: float | None
    layers: list[Layer]
    skipped: list[tuple[str, str]]
    targets: dict[str, float] | None
    groupings: dict[str, Grouping]
    skipped_numel: int = 0

    def check_data(self, data: Batches | Calibration | None) -> Calibration | None:
        """``data`` as a :class:`Calibration`, or :class:`MissingDataError` when the
        criterion needs batches and got none (nothing is read from ``data``)."""
        crit = self.spec.crit
        if crit.requires_data and data is None:
            raise MissingDataError(
                f"criterion {crit.name!r} needs calibration batches; Fix: pass data=[(x, y), "
                "...] (a few training batches, or a DataLoader)."
            )
        return Calibration.of(data, self.spec.loss_fn)


def _check_sparsity(sparsity: float | None, spec: PruneSpec) -> None:
    gran = spec.gran
    if isinstance(gran, NM):
        if sparsity is not None and abs(check_sparsity(sparsity) - gran.sparsity) > 1e-9:
            raise InvalidSparsityError(
                f"granularity {gran.name} fixes sparsity at {gran.sparsity:g}, got {sparsity!r}; "
                "Fix: omit sparsity (or pass the matching value)."
            )
    elif sparsity is not None:
        check_sparsity(sparsity)
    elif not isinstance(spec.allocation, Mapping):
        raise InvalidSparsityError(f"granularity {gran.name!r} needs sparsity=<fraction in [0, 1)>")


def _allocation(spec: PruneSpec, dense: Mapping[str, object]) -> Allocation:
    """``spec.allocation`` without the entries of the ``dense`` layers (kept dense by
    default): a ``{layer: sparsity}`` naming every layer prunes all but those."""
    if not isinstance(spec.allocation, Mapping):
        return spec.allocation
    return {k: v for k, v in spec.allocation.items() if k not in dense}


def plan(model: nn.Module, sparsity: float | None, spec: PruneSpec) -> PrunePlan:
    """Resolve and validate a prune of ``model`` to ``sparsity`` under ``spec``: which
    layers, their groupings and targets. Pure and data-free: the model is not touched.

    Raises:
        PruningError: a subclass naming the layer, the value and the fix.
    """
    _check_sparsity(sparsity, spec)
    gran, crit = spec.gran, spec.crit
    usable, skipped, dense = _usable(model, spec)
    for layer in usable:
        _check_criterion(crit, layer)
    skipped, skipped_numel = _skipped(model, spec, skipped)
    targets = (
        None
        if isinstance(gran, NM) or spec.scope == "global"
        else allocate(usable, sparsity, _allocation(spec, dense))
    )
    groupings = {ly.name: gran.grouping(tuple(ly.canonical.shape)) for ly in usable}
    return PrunePlan(model, spec, sparsity, usable, skipped, targets, groupings, skipped_numel)


def _masks(plan: PrunePlan, layer_plans: list[LayerPlan]) -> list[Tensor]:
    """Packed storage-layout masks of every layer of ``plan``."""
    spec, gran = plan.spec, plan.spec.gran
    if isinstance(gran, NM):
        return _nm_masks(layer_plans, gran, spec.crit)
    if spec.scope == "global":
        n_prune = round(plan.sparsity * sum(p.numel for p in layer_plans))
        packed = select_pool(layer_plans, spec.crit, n_prune, spec.min_keep, spec.seed)
    else:
        packed = [
            select_pool(
                [p],
                spec.crit,
                round(plan.targets[p.layer.name] * p.numel),
                spec.min_keep,
                spec.seed,
            )[0]
            for p in layer_plans
        ]
    return [element_mask(p, m) for p, m in zip(layer_plans, packed, strict=True)]


def apply(plan: PrunePlan, data: Batches | Calibration | None = None) -> PruneReport:
    """Carry out ``plan``: gather the criterion's statistics on ``data``, select, and
    register the masks. The only step that changes the model; every check that can fail
    runs before the first mask is written.
    """
    calibration = plan.check_data(data)
    spec, gran = plan.spec, plan.spec.gran
    crit = spec.crit
    units = LayerUnits(plan.model, plan.layers, plan.groupings)
    stats = crit.prepare(plan.model, units, calibration) if crit.requires_data else {}
    layer_plans = [
        LayerPlan(
            ly, gran, plan.groupings[ly.name], stats.get(ly.name), spec.seed, crit.per_group_stats
        )
        for ly in plan.layers
    ]
    before = [_layer_sparsity(ly) for ly in plan.layers]
    masks = _masks(plan, layer_plans)
    for layer_plan, mask in zip(layer_plans, masks, strict=True):
        apply_packed(layer_plan.layer.module, mask)
    tie_masks(plan.model)
    return _report(plan, before)


def _report(plan: PrunePlan, before: list[float]) -> PruneReport:
    gran = plan.spec.gran
    results = [
        LayerResult(
            ly.name,
            ly.kind,
            tuple(ly.weight.shape),
            ly.weight.numel(),
            gran.sparsity
            if isinstance(gran, NM)
            else (None if plan.targets is None else plan.targets[ly.name]),
            b,
            _layer_sparsity(ly),
        )
        for ly, b in zip(plan.layers, before, strict=True)
    ]
    target = gran.sparsity if isinstance(gran, NM) else plan.sparsity
    return PruneReport(
        gran.name,
        repr(plan.spec.crit),
        plan.spec.scope,
        target,
        results,
        plan.skipped,
        plan.skipped_numel,
    )


def prune(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    spec: PruneSpec | None = None,
    data: Batches | Calibration | None = None,
    **settings: Any,
) -> PruneReport:
    """Mask the lowest-scoring groups of weights so that ``sparsity`` of them are zero:
    ``apply(plan(model, sparsity, spec), data)``.

    Args:
        model: any ``nn.Module``; its Linear, Conv1d/2d/3d, ConvTranspose2d, Embedding and
            transformers ``Conv1D`` layers are prunable. By default its output layer
            (classifier, ``lm_head``) and embeddings stay dense and are reported as
            skipped (:mod:`prunekit.coverage` says how they are found); ``include_output=True``
            / ``include_embeddings=True`` prune them too.
        sparsity: fraction in [0, 1) of the selected weights to be zero afterwards,
            counting weights already masked (so masks compose: 0.5 then 0.9 gives 0.9).
            Not needed for N:M (fixed at ``1 - N/M``).
        spec: a :class:`~prunekit.PruneSpec`; keyword ``settings`` (its field names:
            ``granularity``, ``criterion``, ``scope``, ``allocation``, ``layers``,
            ``exclude``, ``min_keep``, ``seed``, ``loss_fn``, ``include_output``,
            ``include_embeddings``) build one or override it.
        data: calibration batches for data-driven criteria: anything
            :class:`~prunekit.inputs.Calibration` accepts (``[(x, y), ...]``, a DataLoader).

    Returns:
        A :class:`PruneReport`. On any error the model is left exactly as it was.

    Example:
        >>> report = pk.prune(model, 0.9, scope="global")
        >>> report = pk.prune(model, 0.5, granularity="2:4", criterion="wanda", data=batches)
    """
    return apply(plan(model, sparsity, spec_of(spec, settings)), data)
