"""Channel permutations that raise the magnitude N:M pruning keeps (Pool & Yu 2021,
"Channel Permutations for N:M Sparsity", NeurIPS).

N:M keeps the ``n`` largest of every ``m`` consecutive input channels of a consumer layer.
Which channels share a group is arbitrary: permuting the consumer's input channels by
``P`` and its producer's output channels (rows, bias, and a BatchNorm / LayerNorm in
between) by the same ``P`` computes the same function, because elementwise activations
commute with a permutation of channels. The search maximises the retained magnitude

    R(P) = sum over rows r and groups g of the top-n of |W[r, P[g*m : (g+1)*m]]|

(rows = output units x kernel positions) by greedy channel swaps between groups (the
channel-swap refinement of Pool & Yu): each round pairs the ``G`` groups at random and
applies, for every pair, the swap of one channel each that raises ``R`` most, if any.
A round costs ``O(G * m^3 * rows)``, vectorised; rounds stop when swaps stop helping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.table import Table
from torch import Tensor, nn

from prunekit.errors import PermutationError
from prunekit.granularity import NM, parse
from prunekit.inputs import call_eval
from prunekit.masks import get_mask
from prunekit.sparse.gemm import base_type
from prunekit.tables import TableReport

_PASS_THROUGH = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Hardswish,
    nn.Hardtanh, nn.ELU, nn.Identity, nn.Dropout,
)  # fmt: skip
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
_CHUNK = 1 << 23  # elements of one candidate tensor


@dataclass(frozen=True)
class Pair:
    """Producer and consumer (module names) sharing channels, and an optional norm between."""

    producer: str
    consumer: str
    norm: str | None = None


@dataclass(frozen=True)
class PairResult:
    """Retained-magnitude fraction of the consumer under N:M, before and after."""

    pair: Pair
    permutation: Tensor
    before: float
    after: float

    @property
    def gain(self) -> float:
        """Relative gain ``after / before - 1``."""
        return self.after / self.before - 1 if self.before else 0.0


@dataclass(frozen=True)
class PermutationReport(TableReport):
    """What :func:`permute_channels` did; ``max_abs_diff`` is the verified output change."""

    nm: str
    results: list[PairResult]
    max_abs_diff: float | None

    def table(self) -> Table:
        diff = "not verified" if self.max_abs_diff is None else f"{self.max_abs_diff:.2e}"
        table = Table(title=f"{self.nm} channel permutations (max |output change| {diff})")
        for col in ("producer", "norm", "consumer", "kept before", "kept after", "gain"):
            table.add_column(col)
        for r in self.results:
            p = r.pair
            table.add_row(
                p.producer,
                p.norm or "-",
                p.consumer,
                f"{r.before:.4f}",
                f"{r.after:.4f}",
                f"{r.gain:+.2%}",
            )
        return table


def _rows(weight: Tensor) -> Tensor:
    """``|W|`` as ``(out * prod(kernel), in)``: one row per output unit and kernel position."""
    return weight.detach().abs().movedim(1, -1).reshape(-1, weight.shape[1]).float()


def _kept(groups: Tensor, n: int) -> Tensor:
    """Sum over rows of the top-``n`` of each ``(..., rows, m)`` group: shape ``(...)``."""
    return groups.topk(n, dim=-1).values.sum((-1, -2))


def retained_magnitude(weight: Tensor, n: int, m: int, perm: Tensor | None = None) -> float:
    """Fraction of ``sum |W|`` that N:M keeps on the input channels (permuted by ``perm``)."""
    a = _rows(weight)
    a = a if perm is None else a[:, perm]
    total = float(a.sum())
    kept = float(_kept(a.reshape(a.shape[0], -1, m), n).sum())
    return kept / total if total else 1.0


def _pair_gains(a: Tensor, b: Tensor, n: int) -> Tensor:
    """``(P, m, m)``: gain in kept magnitude of swapping channel ``p`` of ``a[k]`` with
    channel ``q`` of ``b[k]``, for ``P`` disjoint group pairs ``a, b`` of shape ``(P, rows, m)``."""
    pairs, rows, m = a.shape
    cand_a = a[:, None, None].expand(pairs, m, m, rows, m).clone()
    cand_b = b[:, None, None].expand(pairs, m, m, rows, m).clone()
    for p in range(m):
        cand_a[:, p, :, :, p] = b.transpose(1, 2)
        cand_b[:, :, p, :, p] = a.transpose(1, 2)
    return _kept(cand_a, n) + _kept(cand_b, n) - (_kept(a, n) + _kept(b, n))[:, None, None]


def search_permutation(
    weight: Tensor, n: int, m: int, rounds: int = 50, patience: int = 5, seed: int = 0
) -> Tensor:
    """A permutation of ``weight``'s input channels (dim 1) raising :func:`retained_magnitude`.

    Each round pairs the groups at random (disjoint pairs, seeded), finds every pair's best
    channel swap in one vectorised step and applies the swaps that gain; it stops after
    ``rounds`` rounds or ``patience`` rounds in a row without a gain.
    """
    a = _rows(weight)
    groups = a.reshape(a.shape[0], -1, m).permute(1, 0, 2).contiguous()  # (G, rows, m)
    g_count, rows, _ = groups.shape
    perm = torch.arange(a.shape[1]).view(g_count, m).clone()
    gen = torch.Generator().manual_seed(seed)
    tol, chunk = 1e-6 * float(a.sum()), max(1, _CHUNK // (m * m * rows * m))
    stale = 0
    for _ in range(rounds if g_count > 1 else 0):
        order = torch.randperm(g_count, generator=gen)
        half = g_count // 2
        ia, ib = order[:half], order[half : 2 * half]
        gains = torch.cat(
            [
                _pair_gains(groups[ia[k : k + chunk]], groups[ib[k : k + chunk]], n).flatten(1)
                for k in range(0, half, chunk)
            ]
        )
        best, where = gains.max(dim=1)
        ok = best > tol
        stale = 0 if bool(ok.any()) else stale + 1
        if stale >= patience:
            break
        pa, pb, p, q = ia[ok], ib[ok], where[ok] // m, where[ok] % m
        column, index = groups[pa, :, p].clone(), perm[pa, p].clone()
        groups[pa, :, p], perm[pa, p] = groups[pb, :, q], perm[pb, q]
        groups[pb, :, q], perm[pb, q] = column, index
    return perm.reshape(-1)


def find_pairs(model: nn.Module) -> list[Pair]:
    """Producer -> consumer pairs in ``nn.Sequential`` chains of Linear -> Linear or
    Conv2d -> Conv2d (``groups=1``), through elementwise activations, dropout and at most
    one BatchNorm / LayerNorm."""
    pairs = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        producer, norm = None, None
        for name, child in seq.named_children():
            full = f"{prefix}.{name}" if prefix else name
            kind = base_type(child)
            if kind in (nn.Linear, nn.Conv2d) and getattr(child, "groups", 1) == 1:
                if producer is not None and producer[1] is kind:
                    pairs.append(Pair(producer[0], full, norm))
                producer, norm = (full, kind), None
            elif isinstance(child, _NORMS) and producer is not None and norm is None:
                norm = full
            elif not isinstance(child, _PASS_THROUGH):
                producer, norm = None, None
    return pairs


def _check(modules: dict[str, nn.Module], pair: Pair, m: int) -> None:
    for role, name in (("producer", pair.producer), ("consumer", pair.consumer)):
        module = modules.get(name)
        if module is None or base_type(module) not in (nn.Linear, nn.Conv2d):
            raise PermutationError(
                f"{role} {name!r} is not a Linear or Conv2d of this model; Fix: name "
                "modules from model.named_modules()."
            )
        if get_mask(module) is not None:
            raise PermutationError(
                f"{role} {name!r} is already masked; Fix: permute channels before pruning "
                "(then prune N:M), or pk.masks.remove(model) first."
            )
        if getattr(module, "groups", 1) != 1:
            raise PermutationError(f"{role} {name!r} is a grouped conv; Fix: exclude the pair.")
    channels = modules[pair.consumer].weight.shape[1]
    if modules[pair.producer].weight.shape[0] != channels:
        raise PermutationError(
            f"producer {pair.producer!r} has {modules[pair.producer].weight.shape[0]} outputs but "
            f"consumer {pair.consumer!r} takes {channels} inputs; Fix: pair adjacent layers."
        )
    if channels % m:
        raise PermutationError(
            f"consumer {pair.consumer!r} has {channels} input channels, not a multiple of M={m}; "
            "Fix: exclude the pair."
        )
    if pair.norm is not None:
        norm = modules.get(pair.norm)
        features = getattr(norm, "num_features", None) or getattr(norm, "weight", torch.empty(0))
        size = features if isinstance(features, int) else features.numel()
        if not isinstance(norm, _NORMS) or size != channels:
            raise PermutationError(
                f"norm {pair.norm!r} is not a BatchNorm/LayerNorm over {channels} channels; "
                "Fix: name the norm between producer and consumer, or none."
            )


@torch.no_grad()
def _apply(modules: dict[str, nn.Module], pair: Pair, perm: Tensor) -> None:
    consumer, producer = modules[pair.consumer], modules[pair.producer]
    consumer.weight.copy_(consumer.weight[:, perm])
    producer.weight.copy_(producer.weight[perm])
    tensors = [producer.bias]
    if pair.norm is not None:
        norm = modules[pair.norm]
        tensors += [
            norm.weight,
            norm.bias,
            *(getattr(norm, k, None) for k in ("running_mean", "running_var")),
        ]
    for t in tensors:
        if t is not None:
            t.copy_(t[perm])


def permute_channels(
    model: nn.Module,
    nm: str = "2:4",
    pairs: Sequence[Pair | tuple[str, str] | tuple[str, str, str | None]] | None = None,
    *,
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
    rounds: int = 50,
    seed: int = 0,
    atol: float = 1e-5,
) -> PermutationReport:
    """Permute channels of producer/consumer ``pairs`` (default: :func:`find_pairs`) so that
    ``nm`` pruning of each consumer keeps more magnitude; the network's function is unchanged.

    Run it on the dense model, then prune with ``granularity=nm``. With ``example_inputs``
    the outputs before and after are compared (``atol`` + 1e-5 relative); on a mismatch
    the permutations are undone and :class:`~prunekit.errors.PermutationError` is raised.

    Raises:
        PermutationError: a pair that is not adjacent Linear/Conv2d layers with matching
            channels, a masked layer, or a changed output. The model is left unchanged.
    """
    gran = parse(nm)
    if not isinstance(gran, NM):
        raise PermutationError(f"nm={nm!r} is not an N:M pattern; Fix: pass e.g. '2:4'.")
    chosen = [p if isinstance(p, Pair) else Pair(*p) for p in (pairs or find_pairs(model))]
    if not chosen:
        raise PermutationError(
            "no producer/consumer pair found; Fix: pass pairs=[(producer, consumer, norm)]."
        )
    modules = dict(model.named_modules())
    for pair in chosen:
        _check(modules, pair, gran.m)
    reference = None if example_inputs is None else call_eval(model, example_inputs)
    results = []
    for pair in chosen:
        weight = modules[pair.consumer].weight
        perm = search_permutation(weight, gran.n, gran.m, rounds, seed=seed)
        before = retained_magnitude(weight, gran.n, gran.m)
        after = retained_magnitude(weight, gran.n, gran.m, perm)
        results.append(PairResult(pair, perm, before, after))
    for r in results:
        _apply(modules, r.pair, r.permutation)
    diff = None
    if reference is not None:
        out = call_eval(model, example_inputs)
        diff = float((out - reference).abs().max())
        if not torch.allclose(out, reference, atol=atol, rtol=1e-5):
            for r in reversed(results):
                _apply(modules, r.pair, torch.argsort(r.permutation))
            raise PermutationError(
                f"permuting channels changed the outputs by up to {diff:.3g} (> atol={atol}): "
                "some pair is not a pure channel chain (a residual, reshape or channel-mixing "
                "op between); Fix: pass pairs= explicitly."
            )
    return PermutationReport(gran.name, results, diff)
