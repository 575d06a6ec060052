"""Sections: sparsity turned into savings (chapter 3.2.1.2, 3.3): shrinking and N:M storage.

Structured: LeNet-5's filters masked (the model keeps its shape) vs removed by
:func:`prunekit.shrink` (smaller layers), each fine-tuned, with MACs, and the speed-up over
the dense model measured by :func:`prunekit.analysis.speedup` (median over interleaved
turns, its range and the load average; never one run's ratio).
N:M: LeNet-300-100 pruned 2:4 and stored as :class:`prunekit.sparse.NMTensor` (kept values
plus 2-bit positions) against its dense and CSR bytes.
"""

from __future__ import annotations

import statistics

from torch import nn

from prunekit.analysis import plots
from prunekit.analysis.profile import Profile, csr_bytes
from prunekit.analysis.report import Section
from prunekit.analysis.timing import Speedup
from prunekit.demo.context import REPEATS, Context
from prunekit.masks import bake
from prunekit.sparse import NMTensor
from prunekit.structured import shrink

RATIOS = (0.25, 0.5, 0.75)
SHRINK_TEXT = (
    "LeNet-5 with 25 / 50 / 75% of its filters and neurons (L2 norm, classifier outputs "
    "kept) masked, or physically removed by pk.shrink, each fine-tuned once. Speed-up over "
    f"the dense model (pk.analysis.speedup): the median of dense / pruned latency over "
    f"{REPEATS} interleaved turns, with its range over the turns; one thread, a batch of "
    "test images, masks baked; latency is the median of the turns, its error bar in the "
    "figure half the range. Masked zeros still run dense kernels, so masking leaves the "
    "MACs, and the latency near the dense model's, whatever the effective MACs; shrinking "
    "lowers MACs and latency together. 'reliable' is false when the load or the spread "
    "makes a figure untrustworthy (see below)."
)
NM_TEXT = (
    "LeNet-300-100 pruned 2:4 (two of every four consecutive inputs, 50%) by magnitude and "
    "fine-tuned once; each weight compressed to NMTensor (kept values + 2-bit positions, "
    "0.5 + 1/32 of the fp32 bytes). CSR at 50% sparsity needs more bytes than dense."
)


def shrink_section(ctx: Context) -> Section:
    """Masked vs shrunk LeNet-5 at several ratios; latency against effective MACs."""
    runs: list[tuple[str, float, nn.Module, float]] = [
        ("dense", 0.0, ctx.lenet5.model, ctx.lenet5.accuracy)
    ]
    for ratio in RATIOS:
        ctx.status(f"filters masked at {ratio:.0%}")
        masked, row = ctx.prune_and_finetune(
            ctx.lenet5, ratio, granularity="filter", criterion="l2"
        )
        runs.append(("masked filters", ratio, masked, row["acc fine-tuned"]))
        ctx.status(f"pk.shrink at {ratio:.0%}")
        shrunk = ctx.copy(ctx.lenet5)
        shrink(shrunk, ctx.example[:1], ratio=ratio)
        runs.append(("pk.shrink", ratio, shrunk, ctx.finetune(shrunk)))
    ctx.status("timing masked and shrunk LeNet-5 against the dense one")
    measured = ctx.speedups([model for _, _, model, _ in runs])
    timed = [t for _, t in measured if t is not None]
    dense_ms = statistics.median(t.latency_a_s for t in timed) * 1e3
    rows, curves = [], {"masked filters": [], "pk.shrink": []}
    for (method, ratio, _, accuracy), (prof, t) in zip(runs, measured, strict=True):
        row, point = _timing_row(prof, t, dense_ms)
        rows.append({"method": method, "ratio": ratio, **row, "acc fine-tuned": accuracy})
        for name in curves if method == "dense" else (method,):
            curves[name].append(point)
    figure = plots.plot_latency_vs_macs(curves, xlabel="effective MACs per forward pass")
    load = timed[-1].load_average
    text = f"{SHRINK_TEXT} Load average {'n/a' if load is None else f'{load:.2f}'} on "
    text += f"{timed[-1].cores} cores while timing."
    if bad := [t for t in timed if not t.reliable]:
        text += f" {len(bad)} of {len(timed)} speed-ups are unreliable (e.g. {bad[0].reason})."
    return Section("Structured shrinking", text, rows, {"latency-vs-macs": figure})


def _timing_row(
    prof: Profile, timed: Speedup | None, dense_ms: float
) -> tuple[dict[str, object], tuple[float, float, float]]:
    """A model's counts and its speed-up over the dense model (``timed``; None: the dense
    model itself, latency ``dense_ms``), and its figure point (eff. MACs, ms, error ms)."""
    if timed is None:
        ms, speed, low, high, reliable = dense_ms, 1.0, 1.0, 1.0, True
    else:
        ms, speed = timed.latency_b_s * 1e3, timed.ratio
        low, high, reliable = timed.low, timed.high, timed.reliable
    row = {
        "params": prof.total.params,
        "nonzero": prof.total.nonzero,
        "MACs": prof.total.macs,
        "eff. MACs": prof.total.effective_macs,
        "latency ms": ms,
        "speed-up": speed,
        "speed-up range": f"{low:.2f}-{high:.2f}",
        "reliable": reliable,
    }
    error = ms * speed * (1 / low - 1 / high) / 2  # half the range, in ms of this model
    return row, (prof.total.effective_macs, ms, error)


def nm_section(ctx: Context) -> Section:
    """2:4 pruning and its compressed bytes per layer."""
    ctx.status("2:4 pruning")
    # Every layer, the classifier too (include_output): each one is stored compressed.
    model, row = ctx.prune_and_finetune(ctx.lenet300, None, granularity="2:4", include_output=True)
    rows = []
    for name, layer in bake(model).named_children():
        weight = layer.weight.detach()
        packed = NMTensor.compress(weight, 2, 4)
        dense = weight.numel() * weight.element_size()
        nnz = int(weight.count_nonzero())
        rows.append({
            "layer": name,
            "shape": "x".join(map(str, weight.shape)),
            "sparsity": 1 - nnz / weight.numel(),
            "dense bytes": dense,
            "2:4 bytes": packed.nbytes,
            "2:4 / dense": packed.nbytes / dense,
            "CSR bytes": csr_bytes(nnz, weight.shape[0], weight.element_size()),
        })  # fmt: skip
    text = (f"{NM_TEXT} Accuracy: {row['acc pruned']:.2%} after pruning, "
            f"{row['acc fine-tuned']:.2%} after fine-tuning "
            f"(dense {ctx.lenet300.accuracy:.2%}).")  # fmt: skip
    return Section("N:M (2:4) storage", text, rows)
