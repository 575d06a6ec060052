"""Group scores -> keep/prune decisions: local and global scope, exact counts, in bounded memory.

A *pool* is a set of layers that compete in one ranking: each layer alone (local scope)
or all selected layers together (global scope). Within a pool we prune the
lowest-scoring groups until the requested number of weights is pruned, counting each
group by its still-alive weights, so sparsity composes with earlier masks and the
achieved count is exact up to one group (exact for element granularity). Ties are broken
by position (earlier layer, then lower index, is pruned first), deterministically.

Memory and speed (why this is written by hand): ``torch.topk``/``kthvalue`` over the
concatenated scores of a 100M-weight model needs several copies of all scores and takes
tens of seconds. Instead the scores are streamed in chunks of output rows, twice:

1. sample ~2^19 scores (all of them when there are fewer) and find, from the sample's
   weighted quantiles, a bracket ``[t_lo, t_hi]`` that contains the cut with
   overwhelming probability (+-4 binomial standard deviations);
2. write the provisional mask (keep everything >= ``t_lo``) packed one bit per group,
   count what falls below ``t_lo`` and keep only the few candidates inside the bracket;
   sort the candidates and clear the bits of those that must go.

If the bracket misses (the count check tells), step 2 runs once more with an open
bracket. Peak extra memory is one chunk, the sample, the candidates and the packed masks.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from prunekit import bits
from prunekit.criteria import Criterion, ScoreContext, guard
from prunekit.errors import PruningError
from prunekit.granularity import Granularity, Grouping
from prunekit.layers import Layer, from_canonical, to_canonical
from prunekit.masks import get_mask, kept_fraction

SAMPLE_SIZE = 1 << 19
CHUNK_ELEMENTS = 1 << 20
_SIGMAS = 4.0


@dataclass
class LayerPlan:
    """One layer to prune, with its full-layer grouping and criterion statistics."""

    layer: Layer
    granularity: Granularity
    grouping: Grouping
    stats: Tensor | None
    seed: int
    per_group_stats: bool = True  # stats hold one value per group (sliced per chunk)

    @property
    def numel(self) -> int:
        return self.layer.weight.numel()

    def row_chunks(self) -> Iterator[tuple[int, int]]:
        """Canonical output-row ranges ``[r0, r1)`` scored one at a time."""
        rows = self.grouping.shape[0]
        step = self.granularity.rows_per_group
        if step is None:
            yield 0, rows
            return
        row_numel = max(1, self.numel // rows)
        per_chunk = max(step * 8, (CHUNK_ELEMENTS // row_numel) // (step * 8) * step * 8)
        for r0 in range(0, rows, per_chunk):
            yield r0, min(rows, r0 + per_chunk)

    def effective_canonical(self) -> Tensor:
        """The weight the model computes with (masked), canonical layout, no grad."""
        return to_canonical(self.layer.module, self.layer.module.weight.detach())

    def scores(self, criterion: Criterion) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Per chunk: flat float scores (dead groups -inf) and alive weights (None = all)."""
        with torch.no_grad():
            weight = self.effective_canonical()
            mask = get_mask(self.layer.module)
            mask = None if mask is None else to_canonical(self.layer.module, mask)
            generator = torch.Generator().manual_seed(
                self.seed ^ zlib.crc32(self.layer.name.encode())
            )
            chunked = self.granularity.rows_per_group is not None  # else one chunk
            first = 0  # the chunk's first row of group statistics (one per row of groups)
            for r0, r1 in self.row_chunks():
                chunk = weight[r0:r1]
                grouping = self.granularity.grouping(tuple(chunk.shape))
                stats = self.stats
                if stats is not None and chunked and self.per_group_stats:
                    rows = grouping.group_shape[0]  # 2-D N:M: M-row chunks of 1-row groups
                    stats, first = stats[first : first + rows], first + rows
                ctx = ScoreContext(self.layer.name, stats, generator)
                scores = criterion_scores(criterion, chunk, grouping, ctx, self.layer)
                alive = None
                if mask is not None:
                    alive = grouping.groups(mask[r0:r1]).sum(-1).reshape(-1)
                    scores = scores.masked_fill(alive == 0, -math.inf)
                yield scores, alive


SORT_CHUNK = 1 << 16  # scores sorted at once by :func:`row_mask` (whole rows, one at least)


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Bool keep-mask pruning exactly ``round(sparsity * in)`` lowest scores of every row
    of ``scores`` ``(out, in)`` (Wanda's comparison group, Sun et al. 2023).

    Ties go to the lower index (a stable sort), so the mask is deterministic. Rows are
    sorted ``SORT_CHUNK`` scores at a time: a sort's values and int64 indices are 12 bytes
    a score, the largest transient of a one-shot LLM prune if done whole.
    """
    n_prune = round(sparsity * scores.shape[1])
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    step = max(1, SORT_CHUNK // max(scores.shape[1], 1))
    for r0 in range(0, scores.shape[0], step):
        order = torch.sort(scores[r0 : r0 + step], dim=1, stable=True).indices[:, :n_prune]
        keep[r0 : r0 + step].scatter_(1, order, False)
    return keep


def criterion_scores(
    criterion: Criterion, chunk: Tensor, grouping: Grouping, ctx: ScoreContext, layer: Layer
) -> Tensor:
    """Flat float32 scores of one chunk, checked for the right shape and for NaN; a user's
    criterion that raises is named in a :class:`~prunekit.errors.UserCallbackError`."""
    score = guard(criterion, criterion.group_scores, f"scoring layer {layer.name!r}")
    scores = score(chunk, grouping, ctx)
    if not isinstance(scores, Tensor) or scores.is_complex():
        kind = getattr(scores, "dtype", type(scores).__name__)
        raise PruningError(
            f"criterion {criterion!r} returned {kind} scores for layer {layer.name!r}; Fix: "
            "return a real-valued tensor (one score per group)."
        )
    if tuple(scores.shape) != grouping.group_shape:
        raise PruningError(
            f"criterion {criterion!r} returned scores of shape {tuple(scores.shape)} for layer "
            f"{layer.name!r}; expected {grouping.group_shape} (one score per group)"
        )
    scores = scores.reshape(-1).to(torch.float32)
    # NaN in the sum means a NaN score (or +inf with -inf); only then look closer.
    if torch.isnan(scores.sum()) and torch.isnan(scores).any():
        raise PruningError(
            f"criterion {criterion!r} produced NaN scores for layer {layer.name!r}; "
            "Fix: check its statistics (data batches, loss) or use another criterion."
        )
    return scores


def _weights(idx: Tensor, alive: Tensor | None, group_size: int) -> Tensor:
    """Alive weights of the groups at ``idx`` (``group_size`` each when nothing is masked)."""
    if alive is not None:
        return alive[idx].to(torch.int64)
    return torch.full(idx.shape, group_size, dtype=torch.int64)


class _Columns:
    """Growable preallocated columns (values, positions...), appended chunk by chunk.

    Results that outlive a chunk are written into storage allocated up front: small
    tensors kept between large per-chunk temporaries would fragment the heap and grow
    the process by about one chunk per chunk.
    """

    def __init__(self, capacity: int, **dtypes: torch.dtype) -> None:
        self.size = 0
        self.data = {k: torch.empty(max(capacity, 1), dtype=d) for k, d in dtypes.items()}

    def append(self, **columns: Tensor) -> None:
        n = next(iter(columns.values())).numel()
        if self.size + n > next(iter(self.data.values())).numel():
            grow = max(2 * (self.size + n), 1024)
            self.data = {
                k: torch.cat([v[: self.size], v.new_empty(grow - self.size)])
                for k, v in self.data.items()
            }
        for k, v in columns.items():
            self.data[k][self.size : self.size + n] = v
        self.size += n

    def __getitem__(self, key: str) -> Tensor:
        return self.data[key][: self.size]


def _merge_top(best_v: Tensor, best_i: Tensor, scores: Tensor, offset: int) -> None:
    """Update the running top-k (values, flat indices; k = len(best_v)) in place."""
    k = best_v.numel()
    if k == 1:  # max is an order of magnitude faster than topk on CPU
        value, index = scores.max(0)
        top_v, top_i = value.reshape(1), index.reshape(1)
    else:
        top_v, top_i = scores.topk(min(k, scores.numel()))
    merged_v = torch.cat([best_v, top_v])
    merged_i = torch.cat([best_i, top_i + offset])
    order = merged_v.topk(k).indices
    best_v.copy_(merged_v[order])
    best_i.copy_(merged_i[order])


def _top_groups(plans: list[LayerPlan], criterion: Criterion, min_keep: int) -> list[Tensor]:
    """Flat indices of each layer's ``min_keep`` best alive groups (all of them, when it has
    fewer: memory stays bounded by the layer, whatever ``min_keep`` asks)."""
    protected = []
    for plan in plans:
        k = min(min_keep, plan.grouping.num_groups)
        best_v, best_i, offset = torch.full((k,), -math.inf), torch.zeros(k, dtype=torch.int64), 0
        for scores, _ in plan.scores(criterion):
            _merge_top(best_v, best_i, scores, offset)
            offset += scores.numel()
        protected.append(best_i[best_v > -math.inf].clone())
    return protected


def _survey(plans: list[LayerPlan], criterion: Criterion, seed: int) -> tuple[_Columns, bool]:
    """One pass: a weighted sample of the finite scores.

    The sample holds every group when the pool has at most ``SAMPLE_SIZE`` of them
    (``exhaustive``).
    """
    total = sum(p.grouping.num_groups for p in plans)
    exhaustive = total <= SAMPLE_SIZE
    generator = torch.Generator().manual_seed(seed)
    sample = _Columns(
        min(total, SAMPLE_SIZE) + len(plans) * 64, values=torch.float32, weights=torch.int64
    )
    for plan in plans:
        for scores, alive in plan.scores(criterion):
            if exhaustive:
                idx = torch.arange(scores.numel())
            else:
                n = max(1, round(SAMPLE_SIZE * scores.numel() / total))
                idx = torch.randint(scores.numel(), (n,), generator=generator)
            sampled = scores[idx]
            finite = torch.isfinite(sampled)
            sample.append(
                values=sampled[finite],
                weights=_weights(idx[finite], alive, plan.grouping.group_size),
            )
    return sample, exhaustive


def _bracket(sample: _Columns, exhaustive: bool, fraction: float) -> tuple[float, float]:
    """Score bracket around the ``fraction`` quantile (by weight) of the alive groups."""
    values = sample["values"]
    n = values.numel()
    if n == 0:
        return -math.inf, math.inf
    order = torch.sort(values, stable=True)
    cum = sample["weights"][order.indices].cumsum(0).double()
    cum /= cum[-1].clone()
    cut = int(
        torch.searchsorted(cum, torch.tensor([fraction], dtype=torch.float64)).clamp(max=n - 1)
    )
    # The sample's count below the true cut is binomial(n, fraction): +-4 sigma brackets it.
    sigma = math.sqrt(n * fraction * (1 - fraction))
    spread = 0 if exhaustive else math.ceil(_SIGMAS * sigma) + 2
    lo, hi = max(0, cut - spread), min(n - 1, cut + spread)
    t_lo = float(order.values[lo]) if lo > 0 or exhaustive else -math.inf
    t_hi = float(order.values[hi]) if hi < n - 1 or exhaustive else math.inf
    return t_lo, t_hi


@dataclass
class _Marked:
    """Result of the marking pass: provisional packed masks, weight below, candidates."""

    masks: list[Tensor]
    below: int
    candidates: _Columns


def _mark(
    plans: list[LayerPlan],
    criterion: Criterion,
    protected: list[Tensor],
    bracket: tuple[float, float],
    capacity: int,
) -> _Marked:
    """Keep everything scoring >= t_lo; collect the candidates inside the bracket."""
    t_lo, t_hi = bracket
    masks = [torch.empty((p.grouping.num_groups + 7) // 8, dtype=torch.uint8) for p in plans]
    candidates = _Columns(
        capacity,
        values=torch.float32,
        positions=torch.int64,
        layer=torch.int64,
        weights=torch.int64,
    )
    below = 0
    for li, plan in enumerate(plans):
        offset, size = 0, plan.grouping.group_size
        for scores, alive in plan.scores(criterion):
            local = protected[li] - offset
            local = local[(local >= 0) & (local < scores.numel())]
            scores = scores.index_fill(0, local, math.inf) if local.numel() else scores
            # Dead groups score -inf and protected ones +inf: neither is ever a candidate.
            keep = scores >= t_lo if t_lo > -math.inf else scores > -math.inf
            candidate = keep & (scores <= t_hi if t_hi < math.inf else scores < math.inf)
            if alive is None:
                below += (scores.numel() - int(torch.count_nonzero(keep))) * size
            else:
                below += int(alive.sum()) - int(alive[keep].sum())
            idx = candidate.nonzero().squeeze(1)
            if idx.numel():
                candidates.append(
                    values=scores[idx],
                    positions=idx + offset,
                    layer=torch.full_like(idx, li),
                    weights=_weights(idx, alive, size),
                )
            packed = bits.pack(keep)
            masks[li][offset // 8 : offset // 8 + packed.numel()] = packed
            offset += scores.numel()
    return _Marked(masks, below, candidates)


def select_pool(
    plans: list[LayerPlan], criterion: Criterion, n_prune: int, min_keep: int, seed: int
) -> list[Tensor]:
    """Packed group-keep masks (one per plan) pruning ``n_prune`` weights of the pool in total.

    ``n_prune`` counts weights already masked. Every layer keeps at least ``min_keep``
    groups: when a first, unconstrained selection would leave a layer with fewer, the
    selection is redone with each layer's best ``min_keep`` groups reserved (and
    ``n_prune`` clamped to what that allows).
    """
    sample, exhaustive = _survey(plans, criterion, seed)
    masks = _select(plans, criterion, n_prune, sample, exhaustive, [])
    floor = [min(min_keep, p.grouping.num_groups) for p in plans]
    if any(bits.count_ones(m) < f for m, f in zip(masks, floor, strict=True)):
        protected = _top_groups(plans, criterion, min_keep)
        masks = _select(plans, criterion, n_prune, sample, exhaustive, protected)
    return masks


def _select(
    plans: list[LayerPlan],
    criterion: Criterion,
    n_prune: int,
    sample: _Columns,
    exhaustive: bool,
    protected: list[Tensor],
) -> list[Tensor]:
    protected = protected or [torch.empty(0, dtype=torch.int64) for _ in plans]
    alive_total, dead = 0, 0
    for plan in plans:
        kept = round(kept_fraction(plan.layer.module) * plan.numel)
        alive_total += kept
        dead += plan.numel - kept
    reserved = sum(
        len(p) * plan.grouping.group_size for p, plan in zip(protected, plans, strict=True)
    )
    need_total = min(n_prune - dead, alive_total - reserved)
    if need_total <= 0:
        return [bits.pack(torch.ones(p.grouping.num_groups, dtype=torch.bool)) for p in plans]
    bracket = _bracket(sample, exhaustive, need_total / max(alive_total, 1))
    inside = int(((sample["values"] >= bracket[0]) & (sample["values"] <= bracket[1])).sum())
    total_groups = sum(p.grouping.num_groups for p in plans)
    capacity = 2 * inside * total_groups // max(sample.size, 1) + 1024
    marked = _mark(plans, criterion, protected, bracket, capacity)
    need = need_total - marked.below
    if need < 0 or need > int(marked.candidates["weights"].sum()):
        # The sample misled us (a tail event): open the bracket on the side that failed.
        bracket = (-math.inf, bracket[1]) if need < 0 else (bracket[0], math.inf)
        marked = _mark(plans, criterion, protected, bracket, capacity)
        need = need_total - marked.below
        if need < 0 or need > int(marked.candidates["weights"].sum()):
            # An open bracket always holds the cut, unless the scores moved between passes.
            raise PruningError(
                f"criterion {criterion!r} scored the same weights differently in two passes; "
                "Fix: make its scores reproducible (draw random numbers from ctx.generator, "
                "not the global RNG)."
            )
    cand = marked.candidates
    if need > 0 and cand.size:
        order = torch.sort(cand["values"], stable=True).indices
        cum = cand["weights"][order].cumsum(0)
        take = int(torch.searchsorted(cum, torch.tensor([need]))) + 1
        before = int(cum[take - 2]) if take > 1 else 0  # taking one candidate fewer
        if abs(before - need) <= abs(int(cum[take - 1]) - need):
            take -= 1  # the nearest whole group wins (ties: the smaller count)
        chosen = order[:take]
        layer_ids, positions = cand["layer"][chosen], cand["positions"][chosen]
        for li in layer_ids.unique().tolist():
            bits.clear(marked.masks[li], positions[layer_ids == li])
    return marked.masks


def element_mask(plan: LayerPlan, packed_groups: Tensor) -> Tensor:
    """Turn a packed group-keep mask into the packed weight mask in storage layout."""
    grouping = plan.grouping
    module = plan.layer.module
    if grouping.group_size == 1 and to_canonical(module, plan.layer.weight) is plan.layer.weight:
        return packed_groups
    keep = bits.unpack(packed_groups, grouping.group_shape)
    return bits.pack(from_canonical(module, grouping.expand(keep)).contiguous())
