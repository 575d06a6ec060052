"""``pk.llm.shrink``: a smaller dense causal LM, uniform in width, saved as a standard config.

    import prunekit as pk
    result = pk.llm.shrink(model, data=ids, target_params=0.5)            # width + depth
    result = pk.llm.shrink(model, data=ids, heads=8, kv_heads=4, intermediate=1024,
                           hidden=384, drop_layers=2, importance="activation")
    model.save_pretrained("small")     # transformers.AutoModelForCausalLM loads it as is

Steps: :func:`plan` (pure, data-free: architecture, sizes, divisibility, bounds; nothing
is touched and every error is raised here), then importance on the unchanged model
(:func:`prunekit.llm.width.width_importance`, and
:func:`prunekit.llm.depth.choose_layers` when ``drop_layers`` is a count), then the only
mutation: :func:`prunekit.llm.depth.drop_layers` and
:func:`prunekit.llm.reshape.slice_widths`.

Width is uniform: every block keeps the same number of query heads, KV heads (the query
heads per KV head may shrink, never grow) and MLP neurons, each block its own most
important ones; the embedding channels kept are one set for the whole residual stream.

``target_params=p`` keeps at most a fraction ``p`` of the parameters, as close to it as
the rounding allows (the rule; ``depth_fraction`` or explicit sizes override it):
``depth_fraction`` (default 0.25) of the parameters to remove go by whole blocks (rounded
to the nearest block, at least one block kept), the rest by width: the hidden size and
the MLP width are scaled by one common factor (rounded to multiples of ``multiple``)
found by bisection on the exact parameter count, attention heads kept (GPT-2 ties its
attention width to the hidden size, so there the heads scale too). Width before depth in
the split follows Minitron's finding that width-pruned models recover better after
distillation than depth-pruned ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prunekit.errors import MissingDataError, PruningError
from prunekit.llm.anatomy import Anatomy, Widths, counted_size, describe, param_count
from prunekit.llm.calibration import TokenData, calibration_batches
from prunekit.llm.depth import DEPTH_IMPORTANCE, check_drop, choose_layers, drop_layers
from prunekit.llm.reshape import Keep, slice_widths
from prunekit.llm.width import WIDTH_IMPORTANCE, WidthScores, width_importance
from prunekit.spec import Constraint, Settings, integer, one_of


def _optional(inner: Constraint) -> Constraint:
    return Constraint(lambda v: None if v is None else inner.check(v), f"None or {inner.text}")


def _fraction(low_open: bool) -> Constraint:
    def check(value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not (0 < value <= 1 if low_open else 0 <= value <= 1):
            raise PruningError("is not a number in " + ("(0, 1]" if low_open else "[0, 1]"))
        return float(value)

    return Constraint(check, "a number in (0, 1]" if low_open else "a number in [0, 1]")


def _layers(value: Any) -> int | tuple[int, ...] | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, list | tuple) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        return tuple(value)
    raise PruningError("is neither a count of blocks nor a list of block indices")


@dataclass(frozen=True)
class ShrinkSettings(Settings):
    """What :func:`shrink` makes (module docstring).

    Attributes:
        heads / kv_heads / intermediate / hidden: widths every block keeps (None: as is;
            ``kv_heads`` None scales with ``heads``).
        drop_layers: a count of blocks to remove (chosen by ``depth_importance``) or the
            indices of the blocks to remove.
        target_params: fraction of the parameters to keep; chooses the sizes above by the
            rule of the module docstring (exclusive with them).
        depth_fraction: share of the removed parameters taken by whole blocks.
        importance: width criterion: ``activation`` (Minitron), ``taylor``, ``magnitude``.
        depth_importance: ``bi`` (ShortGPT), ``angular`` (Gromov et al.), ``loss``.
        multiple: target sizes are rounded to multiples of this.
        batch_size: calibration rows per forward.
    """

    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    hidden: int | None = None
    drop_layers: int | tuple[int, ...] | None = None
    target_params: float | None = None
    depth_fraction: float = 0.25
    importance: str = "activation"
    depth_importance: str = "bi"
    multiple: int = 8
    batch_size: int = 8

    constraints: ClassVar[Mapping[str, Constraint]] = {
        **{k: _optional(integer(1)) for k in ("heads", "kv_heads", "intermediate", "hidden")},
        "drop_layers": Constraint(_layers, "a count >= 0 or a list of block indices"),
        "target_params": _optional(_fraction(low_open=True)),
        "depth_fraction": _fraction(low_open=False),
        "importance": one_of("width importance", *WIDTH_IMPORTANCE),
        "depth_importance": one_of("depth importance", *DEPTH_IMPORTANCE),
        "multiple": integer(1),
        "batch_size": integer(1),
    }

    def check(self) -> None:
        explicit = [
            k
            for k in ("heads", "kv_heads", "intermediate", "hidden", "drop_layers")
            if getattr(self, k) is not None
        ]
        if self.target_params is not None and explicit:
            raise PruningError(
                f"target_params={self.target_params} chooses the sizes itself, but "
                f"{', '.join(explicit)} were given too; Fix: pass one or the other."
            )


@dataclass(frozen=True)
class ShrinkPlan:
    """What :func:`shrink` will do: target widths and the blocks to drop (a count when
    importance chooses them), checked against the model."""

    before: Widths
    after: Widths
    drop: int | tuple[int, ...]
    params_before: int
    params_after: int
    needs_data: bool


@dataclass
class ShrinkResult:
    """What :func:`shrink` removed; per block indices are of the original model."""

    before: Widths
    after: Widths
    dropped_layers: tuple[int, ...]
    removed_heads: dict[int, list[int]] = field(default_factory=dict)
    removed_kv_heads: dict[int, list[int]] = field(default_factory=dict)
    removed_neurons: dict[int, list[int]] = field(default_factory=dict)
    removed_hidden: list[int] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    importance: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        b, a = self.before, self.after
        return (
            f"shrunk ({self.importance}): heads {b.heads}->{a.heads}, kv heads {b.kv_heads}->"
            f"{a.kv_heads}, MLP {b.intermediate}->{a.intermediate}, hidden {b.hidden}->"
            f"{a.hidden}, blocks dropped {list(self.dropped_layers)}; parameters "
            f"{self.params_before:,} -> {self.params_after:,} "
            f"({self.params_after / self.params_before:.1%}) in {self.seconds:.1f}s"
        )


def _check_widths(anatomy: Anatomy, want: Widths) -> None:
    have, gpt2 = anatomy.widths, anatomy.model_type == "gpt2"
    for name in ("heads", "kv_heads", "intermediate", "hidden"):
        if getattr(want, name) > getattr(have, name):
            raise PruningError(
                f"{name}={getattr(want, name)} is more than the model's {getattr(have, name)}; "
                f"Fix: pass at most {getattr(have, name)} (shrink only narrows)."
            )
    if want.heads % want.kv_heads or want.heads // want.kv_heads > anatomy.group_size:
        raise PruningError(
            f"heads={want.heads} with kv_heads={want.kv_heads}: every KV head must serve the "
            f"same number of query heads, at most the model's {anatomy.group_size}; Fix: "
            f"heads a multiple of kv_heads, at most {anatomy.group_size} x kv_heads."
        )
    if gpt2 and want.hidden != want.heads * anatomy.head_dim:
        raise PruningError(
            f"GPT-2 ties its attention width to the hidden size (n_embd = n_head x "
            f"{anatomy.head_dim}), so hidden={want.hidden} and heads={want.heads} do not fit; "
            f"Fix: hidden={want.heads * anatomy.head_dim}, or heads=hidden/{anatomy.head_dim}."
        )


def _explicit_widths(anatomy: Anatomy, s: ShrinkSettings) -> Widths:
    have = anatomy.widths
    heads = s.heads or have.heads
    if anatomy.model_type == "gpt2" and s.heads is None and s.hidden is not None:
        heads = max(1, s.hidden // anatomy.head_dim)
    hidden = s.hidden or (heads * anatomy.head_dim if anatomy.model_type == "gpt2" else have.hidden)
    kv = s.kv_heads or max(1, have.kv_heads * heads // have.heads)
    return Widths(heads, kv, s.intermediate or have.intermediate, hidden)


def _scaled(size: int, factor: float, multiple: int) -> int:
    return min(size, max(multiple, multiple * round(size * factor / multiple)))


def _width_for(anatomy: Anatomy, factor: float, multiple: int) -> Widths:
    have = anatomy.widths
    if anatomy.model_type == "gpt2":
        heads = max(1, round(have.heads * factor))
        return Widths(
            heads, heads, _scaled(have.intermediate, factor, multiple), heads * anatomy.head_dim
        )
    return Widths(
        have.heads,
        have.kv_heads,
        _scaled(have.intermediate, factor, multiple),
        _scaled(have.hidden, factor, multiple),
    )


def _target(anatomy: Anatomy, s: ShrinkSettings) -> tuple[Widths, int]:
    total = param_count(anatomy.model)
    goal = s.target_params * total
    per_block = (total - counted_size(anatomy, anatomy.widths, frozenset({0}))) or 1
    layers = len(anatomy.blocks)
    count = min(layers - 1, round(s.depth_fraction * (total - goal) / per_block))
    dropped = frozenset(range(count))
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        if counted_size(anatomy, _width_for(anatomy, mid, s.multiple), dropped) <= goal:
            low = mid
        else:
            high = mid
    widths = _width_for(anatomy, low, s.multiple)
    if counted_size(anatomy, widths, dropped) > goal:
        raise PruningError(
            f"target_params={s.target_params} cannot be reached by uniform width and depth "
            f"pruning of this model (smallest: {counted_size(anatomy, widths, dropped):,} of "
            f"{total:,} parameters); Fix: a larger target_params or depth_fraction, or a "
            "smaller multiple."
        )
    return widths, count


def _settings(settings: ShrinkSettings | None, changes: Mapping[str, Any]) -> ShrinkSettings:
    if settings is not None and not isinstance(settings, ShrinkSettings):
        raise PruningError(
            f"settings={settings!r} is not a ShrinkSettings; Fix: pass pk.llm.ShrinkSettings(...)."
        )
    base = settings or ShrinkSettings()
    return base.replace(**changes) if changes else base


def plan(model: nn.Module, settings: ShrinkSettings | None = None, **changes: Any) -> ShrinkPlan:
    """The checked :class:`ShrinkPlan` for ``model`` (data-free; nothing changes).

    Raises:
        IncompatibleLayerError: an unsupported architecture.
        PruningError: sizes out of bounds, indivisible heads, bad block indices, a target
            that cannot be reached, or settings that contradict each other.
    """
    s = _settings(settings, changes)
    anatomy = describe(model)
    if s.target_params is not None:
        after, drop = _target(anatomy, s)
    else:
        after, drop = _explicit_widths(anatomy, s), s.drop_layers or 0
    _check_widths(anatomy, after)
    if isinstance(drop, tuple):
        check_drop(anatomy, list(drop))
        dropped = frozenset(drop)
    elif drop:
        check_drop(anatomy, list(range(drop)))
        dropped = frozenset(range(drop))
    else:
        dropped = frozenset()
    width_data = after != anatomy.widths and s.importance != "magnitude"
    needs = width_data or (isinstance(drop, int) and drop > 0)
    size = counted_size(anatomy, after, dropped)
    return ShrinkPlan(anatomy.widths, after, drop, param_count(model), size, needs)


def _top(scores: Tensor, count: int) -> Tensor:
    return torch.argsort(scores, descending=True, stable=True)[:count].sort().values


def select(scores: WidthScores, anatomy: Anatomy, after: Widths, blocks: list[int]) -> Keep:
    """The units to keep in ``blocks`` (original indices): per block the top KV groups,
    then the top query heads within each kept group; the top neurons; the top channels."""
    size, per_group = anatomy.group_size, after.heads // after.kv_heads
    heads, kvs = [], []
    for i in blocks:
        kv = _top(scores.kv_heads[i], after.kv_heads)
        grouped = scores.heads[i].unflatten(0, (-1, size))
        heads.append(torch.cat([g * size + _top(grouped[g], per_group) for g in kv.tolist()]))
        kvs.append(kv)
    neurons = [_top(scores.neurons[i], after.intermediate) for i in blocks]
    return Keep(heads, kvs, neurons, _top(scores.hidden, after.hidden))


def _removed(total: int, kept: Tensor) -> list[int]:
    return sorted(set(range(total)) - set(kept.tolist()))


def _record(result: ShrinkResult, keep: Keep, blocks: list[int]) -> None:
    w = result.before
    for i, heads, kv, neurons in zip(blocks, keep.heads, keep.kv_heads, keep.neurons, strict=True):
        result.removed_heads[i] = _removed(w.heads, heads)
        result.removed_kv_heads[i] = _removed(w.kv_heads, kv)
        result.removed_neurons[i] = _removed(w.intermediate, neurons)
    result.removed_hidden = _removed(w.hidden, keep.hidden)


def shrink(
    model: nn.Module,
    *,
    data: TokenData | None = None,
    settings: ShrinkSettings | None = None,
    progress: Callable[[str], None] | None = None,
    **changes: Any,
) -> ShrinkResult:
    """Shrink ``model`` in place to uniform widths and fewer blocks (module docstring);
    ``changes`` are :class:`ShrinkSettings` fields. Everything is checked (plan and
    calibration data) before the model changes.

    Raises:
        MissingDataError: a data-driven importance or a block count without ``data``.
        the errors of :func:`plan` and of the calibration data (CalibrationError).
    """
    start = time.perf_counter()
    s = _settings(settings, changes)
    the_plan = plan(model, s)
    if the_plan.needs_data and data is None:
        raise MissingDataError(
            "shrinking by activation/Taylor importance or by a count of blocks needs calibration "
            "token ids; Fix: pass data= (e.g. 128 windows of 256 tokens), importance='magnitude' "
            "and explicit drop_layers=[...] indices."
        )
    if data is not None:
        calibration_batches(data, model, s.batch_size)  # checked before anything changes
    say = progress or (lambda text: None)
    anatomy = describe(model)
    drop = the_plan.drop
    if isinstance(drop, int):
        say(f"choosing {drop} blocks by {s.depth_importance}")
        drop = (
            choose_layers(model, drop, data, method=s.depth_importance, batch_size=s.batch_size)
            if drop
            else ()
        )
    kept_blocks = [i for i in range(len(anatomy.blocks)) if i not in drop]
    result = ShrinkResult(
        the_plan.before,
        the_plan.after,
        tuple(drop),
        params_before=param_count(model),
        importance=s.importance,
    )
    if the_plan.after != the_plan.before:
        say(f"scoring width by {s.importance}")
        scores = width_importance(model, data, method=s.importance, batch_size=s.batch_size)
        keep = select(scores, anatomy, the_plan.after, kept_blocks)
        _record(result, keep, kept_blocks)
    else:
        keep = None
    if drop:
        drop_layers(model, drop)
    if keep is not None:
        slice_widths(describe(model), keep)
    result.params_after = param_count(model)
    result.seconds = time.perf_counter() - start
    return result
