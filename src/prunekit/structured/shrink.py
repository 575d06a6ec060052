"""``pk.shrink``: rank coupled channel groups, remove the weakest, return a smaller model.

    report = pk.shrink(model, example_inputs)             # the masked groups, exactly
    report = pk.shrink(model, example_inputs, ratio=0.5, criterion="l2", scope="local")

- ``ratio=None`` (default) removes exactly the groups whose producing weights are all
  zero, e.g. filters masked by ``pk.prune(granularity="filter")`` (their BatchNorm shift
  and consumer inputs go with them: the result computes what the group-masked model does);
  a model without any is refused (pass a ratio). A float is the fraction of each family's
  groups to remove (local) or of all groups (global); a dict ``{family glob: ratio}``
  (local, unmatched families untouched).
- Masks stay: a mask that is not whole groups (element, N:M) is sliced like its weight
  and registered again on the shrunk weight (:mod:`~prunekit.structured.carry`), so
  fine-tuning cannot refill its zeros; group masks go with the groups they masked.
- ``scope="global"`` ranks groups across families in one ranking, as in
  :func:`prunekit.prune`. Raw scores of different families live on different scales (a
  wide layer's filters have larger norms), so by default (``normalize="auto"``) each
  family's scores are first divided by their mean (``"mean"``), except for criteria
  whose scores are comparable as they are (LAMP: ``"none"``). ``normalize="none"``
  ranks the raw scores.
- ``round_to``: keep a multiple of this many groups per family (8 for tensor cores).
- Never empties a family: at least ``max(1, round_to)`` groups stay.
- The model's outputs never change shape, so the final layer keeps its outputs (its
  inputs may shrink with the layer before it); ``ignore=[names, globs or types]`` keeps
  layers whole, inputs included.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunekit.cost import count_macs
from prunekit.errors import (
    InvalidInputsError,
    InvalidSparsityError,
    PruningError,
    ShrinkVerificationError,
    UnknownChoiceError,
)
from prunekit.inputs import Inputs
from prunekit.layers import require_model
from prunekit.masks import bake
from prunekit.masks import remove as remove_masks
from prunekit.structured import carry, collector
from prunekit.structured.graph import DependencyGraph, Ignore, build
from prunekit.structured.importance import StructuredCriterion, resolve, score
from prunekit.structured.planning import Ratio, plan, zero_groups_plan
from prunekit.structured.report import FamilyDecision, ShrinkReport, summary
from prunekit.structured.state import approximate_norms
from prunekit.structured.surgery import (
    AttributeChange,
    Slices,
    group_masked,
    kept_indices,
    remove,
    removed_groups,
    slices,
)
from prunekit.structured.verify import (
    Check,
    Probe,
    check,
    counted_outputs,
    departed,
    probes,
    refilled,
    require_finite,
    restore,
    snapshot,
    swapped_probes,
)

NORMALIZE = ("auto", "mean", "none")


def resolve_normalize(normalize: str, criterion: StructuredCriterion) -> str:
    """``"mean"`` or ``"none"``: what ``normalize="auto"`` means for ``criterion``."""
    if normalize not in NORMALIZE:
        raise UnknownChoiceError("normalize", normalize, list(NORMALIZE))
    if normalize == "auto":
        return "none" if resolve(criterion).comparable else "mean"
    return normalize


def _validate(scope: str, round_to: int, seed: int, ignore: Ignore, approximate: bool) -> None:
    if not isinstance(approximate, bool):
        raise PruningError(f"approximate={approximate!r} must be True or False")
    if scope not in ("local", "global"):
        raise UnknownChoiceError("scope", scope, ["local", "global"])
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise PruningError(f"round_to={round_to!r} must be an int >= 1; Fix: e.g. round_to=8")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise PruningError(f"seed={seed!r} must be an int in [0, 2**63); Fix: e.g. seed=0")
    items = [ignore] if isinstance(ignore, str | type) else ignore
    ok = isinstance(items, list | tuple | set) and all(
        isinstance(i, str) or (isinstance(i, type) and issubclass(i, nn.Module)) for i in items
    )
    if not ok:
        raise PruningError(
            f"ignore={ignore!r} must list module names, glob patterns or nn.Module types; "
            "Fix: e.g. ignore=['classifier'] or ignore=[nn.LayerNorm]."
        )


def traced_graph(
    model: nn.Module, example_inputs: Inputs, ignore: Ignore, macs: bool = False
) -> DependencyGraph:
    """The dependency graph (with ``macs``, the MACs counted in the traced pass); inputs
    the model rejects: InvalidInputsError."""
    try:
        return build(model, example_inputs, ignore, macs=macs)
    except PruningError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise InvalidInputsError(
            f"the example inputs do not run through {type(model).__name__}: {exc}. Fix: pass "
            "inputs the model accepts, e.g. a (1, C, H, W) tensor, a tuple of positional "
            "arguments or a dict of keyword arguments."
        ) from exc


def _is_masked(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def _references(
    probe: nn.Module, graph: DependencyGraph, removed: Mapping[str, tuple[int, ...]],
    example_inputs: Inputs, ratio: Ratio, seed: int, cut: Slices | None, compare: bool,
) -> list[Probe] | None:  # fmt: skip
    """The group-masked model's outputs the shrunk model is compared with (none without
    ``compare``: verify, or approximate mode, which always measures its deviation): the
    model computing as if the pruned positions were zero (:mod:`~prunekit.structured.masked`,
    its largest layers on their kept channels with ``cut``, the removal's new tensors;
    the trace's outputs are the dense ones), or from a copy of the model whose removed
    groups are refilled with noise when they were zero already (``ratio=None``)."""
    if not compare:
        return None
    if ratio is not None:
        positions = graph.positions(removed)
        dense = graph.trace.outputs
        return swapped_probes(probe, positions, example_inputs, dense, seed, cut)
    masked = group_masked(probe, graph, removed)
    return probes(refilled(masked, removed_groups(graph, removed)), masked, example_inputs, seed)


def _approximate_note(graph: DependencyGraph, result: Check | None) -> str:
    measured = "" if result is None else f"{result.deviation:.3g} of their scale"
    return (
        f"APPROXIMATE (not equivalent): channels pass through {graph.trace.norms} "
        f"normalisation(s) over the hidden size, which now average over fewer channels; the "
        f"outputs deviate from the group-masked model's by {measured} on the example inputs. "
        "Fine-tune (or distil) to recover; exact shrinking: approximate=False."
    )


def _verify(
    model: nn.Module, found: list[Probe], undo: Callable[[], None], exact: bool, train: bool
) -> Check:
    """:func:`~prunekit.structured.verify.check`, undoing the removal if it fails."""
    try:
        return check(model, found, exact, train)
    except ShrinkVerificationError as exc:
        undo()
        raise ShrinkVerificationError(
            f"shrinking {type(model).__name__} was undone: {exc}. This usually means model "
            "code computes a shape from a channel count (a hard-coded view or split size) or "
            "an operation's rule moves channels wrongly. Fix: ignore=[that module], or "
            "register a rule for the operation (prunekit.structured.register_rule)."
        ) from None


def _masked_groups(
    model: nn.Module, probe: nn.Module, graph: DependencyGraph
) -> list[FamilyDecision]:
    """:func:`~prunekit.structured.planning.zero_groups_plan`, refused when there is
    none (``ratio=None``)."""
    decisions = zero_groups_plan(probe, graph)
    if not any(d.removed for d in decisions):
        raise InvalidSparsityError(
            f"no masked channel group to remove in {type(model).__name__}; Fix: pass "
            "ratio=0.5 (fraction of groups to remove) or prune with pk.prune(model, s, "
            "granularity='filter') first"
        )
    return decisions


def _apply(
    model: nn.Module, probe: nn.Module, graph: DependencyGraph,
    removed: Mapping[str, tuple[int, ...]], masks: carry.Masks, cut: Slices | None,
) -> tuple[list[AttributeChange], list[str], Callable[[], None]]:  # fmt: skip
    """Remove the groups from ``model`` (with ``cut``, its new tensors where made), its
    masks kept (sliced): the attribute changes, the notes, and a function that undoes it
    all (masks included)."""
    cuts = kept_indices(probe, graph, removed) if masks else {}
    classes = {n: type(m) for n, m in model.named_modules() if parametrize.is_parametrized(m)}
    if probe is not model:
        remove_masks(model)  # the originals come back; their masks follow, sliced
    saved = snapshot(model)
    changes, notes = remove(model, graph, removed, cut)
    carry.register(model, carry.sliced(masks, cuts, graph.trace.aliases))

    def undo() -> None:
        remove_masks(model)
        restore(model, saved)
        carry.register(model, masks)
        for name, cls in classes.items():  # the very classes (their properties still stand)
            model.get_submodule(name).__class__ = cls

    return changes, notes, undo


@collector.pausing  # the collector would scan the graph's objects again and again
def shrink(
    model: nn.Module,
    example_inputs: Inputs,
    ratio: Ratio = None,
    *,
    criterion: StructuredCriterion = "l2",
    scope: str = "local",
    round_to: int = 1,
    normalize: str = "auto",
    ignore: Ignore = (),
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    seed: int = 0,
    verify: bool = True,
    approximate: bool = False,
) -> ShrinkReport:
    """Physically remove channel / head / neuron groups of ``model`` in place.

    See the module docstring for ``ratio``, ``scope`` and ``round_to``; the criteria are
    in :mod:`prunekit.structured.importance`. Everything is validated and planned before
    the model changes; on error the model is left as it was. With ``verify`` (default)
    the shrunk model is run on ``example_inputs`` and compared with the group-masked model
    relative to the outputs' scale (:mod:`prunekit.structured.verify`: tolerance 1e-4;
    random inputs at a larger scale join when zeroing the removed groups barely moves the
    outputs, and a note says when the check stayed weak); ``report.deviation`` is what it
    measured. If the shrunk model fails to run (model code that computes a shape from a
    channel count) or differs, every change is undone and ShrinkVerificationError says why.
    ``verify=False`` saves one to seven forward passes (the group-masked reference, which
    runs its Conv / Linear layers on their kept channels with the removal's new tensors,
    zeroes the other removed activations and copies the other pruned tensors,
    :mod:`~prunekit.structured.masked`; the trace's outputs are the dense ones).

    ``approximate=True`` (opt-in, inexact) also removes channels that a LayerNorm /
    RMSNorm normalises over the last dimension: a transformer's hidden size, through every
    norm and residual (as in Minitron, Muralidharan et al. 2024). The norms then average
    over fewer channels, so the result is *not* the group-masked model: ``report.exact``
    is False, ``report.deviation`` is ``max |y_shrunk - y_masked| / s`` (as for verify,
    :mod:`~prunekit.structured.verify`) measured on ``example_inputs`` (always, whatever
    ``verify``), and a note says so. A transformers ``config`` gets the new width
    (``hidden_size``, ``n_embd``...) where it still describes the layers, so
    ``save_pretrained`` / ``from_pretrained`` rebuild the model.

    Raises:
        InvalidInputsError: the example inputs do not run through the model.
        InvalidSparsityError: ``ratio=None`` on a model without any all-zero group.
        IncompatibleLayerError: a parametrization other than prunekit's masks (unsliceable).
        InvalidWeightError: a parameter or buffer holds NaN or inf (named, before tracing).
        UntraceableError: an operation without a channel rule (register one).
        ShrinkVerificationError: the shrunk model did not compute the masked one's outputs.
        UnknownLayerError, UnknownChoiceError, InvalidSparsityError: other bad arguments.
    """
    require_model(model)
    _validate(scope, round_to, seed, ignore, approximate)
    require_finite(model)
    normalize = resolve_normalize(normalize, criterion)
    masks = carry.masks_of(model)
    # Not validation: a masked model is scored, traced and verified through its effective
    # (baked) weights while the caller's masks stay until the plan is known to apply.
    probe = bake(copy.deepcopy(model)) if _is_masked(model) else model
    with approximate_norms() if approximate else nullcontext():
        # the MACs before, counted in the trace: its functions' shapes are at hand there
        graph = traced_graph(probe, example_inputs, ignore, macs=True)
    if ratio is None:
        decisions = _masked_groups(model, probe, graph)
    else:
        with collector.as_caller() if data is not None else nullcontext():  # their loop
            scores = score(probe, graph, criterion, data=data, loss_fn=loss_fn, seed=seed)
        decisions = plan(graph, scores, ratio, scope, round_to, normalize)
    removed = {d.name: d.removed for d in decisions if d.removed}
    params_before = sum(p.numel() for p in probe.parameters())
    cut = slices(model, graph, removed) if probe is model else None  # made once, used twice
    compare = verify or approximate
    found = _references(probe, graph, removed, example_inputs, ratio, seed, cut, compare)
    macs_before = int(graph.trace.macs or 0)
    changes, notes, undo = _apply(model, probe, graph, removed, masks, cut)
    result = None
    if found is not None:
        result = _verify(model, found, undo, not approximate, graph.trace.trained)
    macs_after = None if result is None else result.macs  # counted in verify's forward
    if approximate:
        notes.append(_approximate_note(graph, result))
    elif result is not None and result.note:
        notes.append(result.note)
    if ratio is None:  # exactly the masked groups: does it still compute the caller's model?
        after, macs_after = (
            (result.outputs, macs_after)
            if result is not None
            else counted_outputs(model, example_inputs)
        )
        notes += departed(graph.trace.outputs, after, example_inputs)
    return ShrinkReport(
        params_before,
        sum(p.numel() for p in model.parameters()),
        macs_before,
        count_macs(model, example_inputs) if macs_after is None else macs_after,
        decisions,
        changes,
        notes,
        deviation=None if result is None else result.deviation,
        exact=not approximate,
        summary=summary(decisions, ratio, resolve(criterion).name, scope),
    )


__all__ = ["ShrinkReport", "plan", "shrink"]
