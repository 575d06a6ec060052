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

1. sample ~2^18 scores (all of them when there are fewer) and find, from the sample's
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
from prunekit.criteria import Criterion, ScoreContext
from prunekit.errors import PruningError
from prunekit.granularity import Granularity, Grouping
from prunekit.layers import Layer, from_canonical, to_canonical
from prunekit.masks import get_mask

SAMPLE_SIZE = 1 << 18
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
            generator = torch.Generator().manual_seed(self.seed ^ zlib.crc32(self.layer.name.encode()))
            step = self.granularity.rows_per_group or self.grouping.shape[0]
            for r0, r1 in self.row_chunks():
                chunk = weight[r0:r1]
                grouping = self.granularity.grouping(tuple(chunk.shape))
                stats = None if self.stats is None else self.stats[r0 // step : r1 // step]
                ctx = ScoreContext(self.layer, stats, generator)
                scores = criterion_scores(criterion, chunk, grouping, ctx, self.layer)
                alive = None
                if mask is not None:
                    alive = grouping.groups(mask[r0:r1]).sum(-1).reshape(-1)
                    scores = scores.masked_fill(alive == 0, -math.inf)
                yield scores, alive


def criterion_scores(
    criterion: Criterion, chunk: Tensor, grouping: Grouping, ctx: ScoreContext, layer: Layer
) -> Tensor:
    """Flat float32 scores of one chunk, checked for the right shape and for NaN."""
    scores = criterion.group_scores(chunk, grouping, ctx)
    if tuple(scores.shape) != grouping.group_shape:
        raise PruningError(
            f"criterion {criterion!r} returned scores of shape {tuple(scores.shape)} for layer "
            f"{layer.name!r}; expected {grouping.group_shape} (one score per group)"
        )
    scores = scores.reshape(-1).to(torch.float32)
    if torch.isnan(scores).any():
        raise PruningError(
            f"criterion {criterion!r} produced NaN scores for layer {layer.name!r}; "
            "Fix: check its statistics (data batches, loss) or use another criterion."
        )
    return scores


def _weights(scores: Tensor, alive: Tensor | None, group_size: int) -> Tensor:
    if alive is not None:
        return alive.to(torch.int64)
    return torch.full(scores.shape, group_size, dtype=torch.int64)


def _count(selected: Tensor, alive: Tensor | None, group_size: int) -> int:
    if alive is None:
        return int(torch.count_nonzero(selected)) * group_size
    return int(alive[selected].sum())


@dataclass
class _Sample:
    values: Tensor
    weights: Tensor
    exhaustive: bool


def _survey(
    plans: list[LayerPlan], criterion: Criterion, seed: int, min_keep: int
) -> tuple[_Sample, list[Tensor]]:
    """One pass: a weighted sample of the finite scores, and each layer's protected groups.

    The protected groups are the layer's ``min_keep`` best (alive) groups, never pruned.
    """
    total = sum(p.grouping.num_groups for p in plans)
    exhaustive = total <= SAMPLE_SIZE
    generator = torch.Generator().manual_seed(seed)
    values, weights, protected = [], [], []
    for plan in plans:
        best_v, best_i, offset = torch.empty(0), torch.empty(0, dtype=torch.int64), 0
        for scores, alive in plan.scores(criterion):
            if min_keep > 0:
                top = scores.topk(min(min_keep, scores.numel()))
                best_v = torch.cat([best_v, top.values])
                best_i = torch.cat([best_i, top.indices + offset])
                top = best_v.topk(min(min_keep, best_v.numel()))
                best_v, best_i = top.values, best_i[top.indices]
            offset += scores.numel()
            w = _weights(scores, alive, plan.grouping.group_size)
            if not exhaustive:
                n = max(1, round(SAMPLE_SIZE * scores.numel() / total))
                idx = torch.randint(scores.numel(), (n,), generator=generator)
                scores, w = scores[idx], w[idx]
            finite = torch.isfinite(scores)
            values.append(scores[finite])
            weights.append(w[finite])
        protected.append(best_i[best_v > -math.inf])
    return _Sample(torch.cat(values), torch.cat(weights), exhaustive), protected


def _bracket(sample: _Sample, fraction: float) -> tuple[float, float]:
    """Score bracket around the ``fraction`` quantile (by weight) of the alive groups."""
    if sample.values.numel() == 0:
        return -math.inf, math.inf
    order = torch.sort(sample.values, stable=True)
    cum = sample.weights[order.indices].cumsum(0).double()
    cum /= cum[-1].clone()
    n = order.values.numel()
    cut = int(torch.searchsorted(cum, torch.tensor([fraction], dtype=torch.float64)).clamp(max=n - 1))
    spread = 0 if sample.exhaustive else math.ceil(_SIGMAS * math.sqrt(n) + 2)
    lo, hi = max(0, cut - spread), min(n - 1, cut + spread)
    t_lo = float(order.values[lo]) if lo > 0 or sample.exhaustive else -math.inf
    t_hi = float(order.values[hi]) if hi < n - 1 or sample.exhaustive else math.inf
    return t_lo, t_hi


@dataclass
class _Pass:
    """Result of the marking pass over a pool."""

    masks: list[list[Tensor]]  # per layer, packed keep bits per chunk
    below: int
    values: list[Tensor]
    layer_ids: list[Tensor]
    positions: list[Tensor]
    weights: list[Tensor]


def _mark(
    plans: list[LayerPlan], criterion: Criterion, protected: list[Tensor], t_lo: float, t_hi: float
) -> _Pass:
    out = _Pass([], 0, [], [], [], [])
    for li, plan in enumerate(plans):
        packed, offset = [], 0
        for scores, alive in plan.scores(criterion):
            local = protected[li] - offset
            local = local[(local >= 0) & (local < scores.numel())]
            scores = scores.index_fill(0, local, math.inf) if local.numel() else scores
            out.below += _count(scores < t_lo, alive, plan.grouping.group_size)
            keep = (scores >= t_lo) & (scores > -math.inf)
            candidate = keep & (scores <= t_hi) & (scores < math.inf)
            idx = candidate.nonzero().squeeze(1)
            if idx.numel():
                out.values.append(scores[idx])
                out.positions.append(idx + offset)
                out.layer_ids.append(torch.full_like(idx, li))
                out.weights.append(_weights(scores, alive, plan.grouping.group_size)[idx])
            packed.append(bits.pack(keep))
            offset += scores.numel()
        out.masks.append(packed)
    return out


def _join(chunks: list[Tensor], num_groups: int) -> Tensor:
    """Concatenate per-chunk packed bits (each chunk but the last holds a multiple of 8)."""
    return torch.cat(chunks) if chunks else bits.pack(torch.ones(num_groups, dtype=torch.bool))


def select_pool(
    plans: list[LayerPlan], criterion: Criterion, n_prune: int, min_keep: int, seed: int
) -> list[Tensor]:
    """Packed group-keep masks (one per plan) pruning ``n_prune`` weights of the pool in total.

    ``n_prune`` counts weights already masked; it is clamped to what ``min_keep`` allows.
    """
    sample, protected = _survey(plans, criterion, seed, min_keep)
    alive_total, dead = 0, 0
    for plan in plans:
        mask = get_mask(plan.layer.module)
        kept = plan.numel if mask is None else int(mask.sum())
        alive_total += kept
        dead += plan.numel - kept
    reserved = sum(len(p) * plan.grouping.group_size for p, plan in zip(protected, plans, strict=True))
    need_total = min(n_prune - dead, alive_total - reserved)
    if need_total <= 0:
        return [bits.pack(torch.ones(p.grouping.num_groups, dtype=torch.bool)) for p in plans]
    t_lo, t_hi = _bracket(sample, need_total / max(alive_total, 1))
    result = _mark(plans, criterion, protected, t_lo, t_hi)
    cand_weight = sum(int(w.sum()) for w in result.weights)
    need = need_total - result.below
    if need < 0 or need > cand_weight:
        t_lo, t_hi = (-math.inf, t_hi) if need < 0 else (t_lo, math.inf)
        result = _mark(plans, criterion, protected, t_lo, t_hi)
        need = need_total - result.below
    masks = [_join(m, p.grouping.num_groups) for m, p in zip(result.masks, plans, strict=True)]
    if need > 0 and result.values:
        values = torch.cat(result.values)
        order = torch.sort(values, stable=True).indices
        cum = torch.cat(result.weights)[order].cumsum(0)
        take = int(torch.searchsorted(cum, torch.tensor([need]))) + 1
        if take > 1 and abs(int(cum[take - 2]) - need) <= abs(int(cum[take - 1]) - need):
            take -= 1
        chosen = order[:take]
        layer_ids = torch.cat(result.layer_ids)[chosen]
        positions = torch.cat(result.positions)[chosen]
        for li in layer_ids.unique().tolist():
            bits.clear(masks[li], positions[layer_ids == li])
    return masks


def element_mask(plan: LayerPlan, packed_groups: Tensor) -> Tensor:
    """Turn a packed group-keep mask into the packed weight mask in storage layout."""
    grouping = plan.grouping
    module = plan.layer.module
    if grouping.group_size == 1 and to_canonical(module, plan.layer.weight) is plan.layer.weight:
        return packed_groups
    keep = bits.unpack(packed_groups, grouping.group_shape)
    return bits.pack(from_canonical(module, grouping.expand(keep)).contiguous())
