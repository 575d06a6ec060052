"""Sections: sparsity turned into savings (chapter 3.2.1.2, 3.3): shrinking and N:M storage.

Structured: LeNet-5's filters masked (the model keeps its shape) vs removed by
:func:`prunekit.shrink` (smaller layers), each fine-tuned, with MACs and measured latency.
N:M: LeNet-300-100 pruned 2:4 and stored as :class:`prunekit.sparse.NMTensor` (kept values
plus 2-bit positions) against its dense and CSR bytes.
"""

from __future__ import annotations

from torch import nn

from prunekit.analysis import plots
from prunekit.analysis.profile import csr_bytes
from prunekit.analysis.report import Section
from prunekit.demo.context import Context
from prunekit.demo.granularity import exclusions
from prunekit.masks import bake
from prunekit.sparse import NMTensor
from prunekit.structured import shrink

RATIOS = (0.25, 0.5, 0.75)
SHRINK_TEXT = (
    "LeNet-5 with 25 / 50 / 75% of its filters and neurons (L2 norm, classifier outputs "
    "kept) masked, or physically removed by pk.shrink, each fine-tuned once. Latency: one "
    "thread, a batch of test images, masks baked, all models timed in interleaved turns. "
    "Masked zeros still run dense kernels, so masking leaves the MACs, and the latency near "
    "the dense model's, whatever the effective MACs; shrinking lowers MACs and latency "
    "together. On a busy machine the latencies are noisy: see the load in the protocol."
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
            ctx.lenet5, ratio, granularity="filter", criterion="l2", exclude=exclusions("filter")
        )
        runs.append(("masked filters", ratio, masked, row["acc fine-tuned"]))
        ctx.status(f"pk.shrink at {ratio:.0%}")
        shrunk = ctx.copy(ctx.lenet5)
        shrink(shrunk, ctx.example[:1], ratio=ratio)
        runs.append(("pk.shrink", ratio, shrunk, ctx.finetune(shrunk)))
    ctx.status("timing masked and shrunk LeNet-5")
    measured = ctx.measure([model for _, _, model, _ in runs])
    dense_ms = measured[0][1]
    rows, curves = [], {"masked filters": [], "pk.shrink": []}
    for (method, ratio, _, accuracy), (prof, ms) in zip(runs, measured, strict=True):
        rows.append({
            "method": method,
            "ratio": ratio,
            "params": prof.total.params,
            "nonzero": prof.total.nonzero,
            "MACs": prof.total.macs,
            "eff. MACs": prof.total.effective_macs,
            "latency ms": ms,
            "speed-up": dense_ms / ms,
            "acc fine-tuned": accuracy,
        })  # fmt: skip
        for name in curves if method == "dense" else (method,):
            curves[name].append((prof.total.effective_macs, ms))
    figure = plots.plot_latency_vs_macs(curves, xlabel="effective MACs per forward pass")
    return Section("Structured shrinking", SHRINK_TEXT, rows, {"latency-vs-macs": figure})


def nm_section(ctx: Context) -> Section:
    """2:4 pruning and its compressed bytes per layer."""
    ctx.status("2:4 pruning")
    model, row = ctx.prune_and_finetune(ctx.lenet300, None, granularity="2:4")
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
