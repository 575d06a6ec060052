"""What :func:`prunekit.llm.prune` did: per-layer sparsity and error, time, peak memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table
from torch import nn

from prunekit.llm.experts import PARAMS
from prunekit.tables import TableReport


@dataclass(frozen=True)
class LayerRecord:
    """One pruned layer: its target and achieved sparsity, and its relative output error
    ``||(W - W') X||_F^2 / ||W X||_F^2`` on its calibration inputs."""

    name: str
    shape: tuple[int, ...]
    numel: int
    target: float
    sparsity: float
    error: float


@dataclass(frozen=True)
class BlockRecord:
    """One block: how many of its parameters were pruned and to what sparsity, the
    parameters pruned and those left dense (names relative to the block)."""

    name: str
    numel: int
    pruned_numel: int
    zeros: int
    dense: tuple[str, ...]
    pruned: tuple[str, ...] = ()

    @property
    def sparsity(self) -> float:
        """Zeros over the pruned tensors only."""
        return self.zeros / max(self.pruned_numel, 1)

    @property
    def share(self) -> float:
        """Share of all the block's parameters that the pruned tensors hold."""
        return self.pruned_numel / max(self.numel, 1)


def block_records(
    blocks: nn.ModuleList, prefix: str, layers: list[LayerRecord]
) -> list[BlockRecord]:
    """Per block: parameters, pruned weights (``layers`` under ``prefix.i.``) and their
    zeros, and the names of the parameters left dense (biases, norms, routers...)."""
    records = []
    for index, block in enumerate(blocks):
        name = f"{prefix}.{index}"
        mine = [r for r in layers if r.name.startswith(f"{name}.")]
        covered = {_param_name(r.name[len(name) + 1 :]) for r in mine}
        params = dict(block.named_parameters())
        dense = tuple(n for n in params if _plain(n) not in covered)
        pruned = tuple(_plain(n) for n in params if _plain(n) in covered)
        zeros = round(sum(r.sparsity * r.numel for r in mine))
        total = sum(p.numel() for p in params.values())
        numel = sum(r.numel for r in mine)
        records.append(BlockRecord(name, total, numel, zeros, dense, pruned))
    return records


def _param_name(record: str) -> str:
    """The parameter a record prunes: ``mlp.up_proj`` -> ``mlp.up_proj.weight``; an expert
    matrix ``mlp.experts.down_proj.3`` -> ``mlp.experts.down_proj``."""
    head, _, last = record.rpartition(".")
    return head if last.isdigit() and head.endswith(PARAMS) else f"{record}.weight"


def _plain(name: str) -> str:
    """``x.parametrizations.weight.original`` (a masked weight) -> ``x.weight``."""
    return name.replace(".parametrizations.weight.original", ".weight")


@dataclass(frozen=True)
class LLMPruneReport(TableReport):
    """Settings, per-layer records, wall time and peak memory of one pruning run."""

    method: str
    target: str
    allocation: str
    samples: int
    tokens: int
    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0
    peak_bytes: int | None = None
    peak_source: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    skipped_numel: int = 0
    blocks: list[BlockRecord] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    """``(layer, note)``: e.g. MoE experts that got no calibration token and fell back to
    magnitude (:mod:`prunekit.llm.moe`)."""

    @property
    def share(self) -> float:
        """Share of all block parameters that the pruned layers hold (1 - the share of
        biases, norms, routers and skipped tensors)."""
        total = sum(b.numel for b in self.blocks)
        return self.numel / total if total else 1.0

    @property
    def numel(self) -> int:
        """Weights of the pruned layers: what :attr:`sparsity` is a fraction of."""
        return sum(r.numel for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over the pruned layers (``numel`` weights); embeddings, the
        head and the ``skipped`` tensors of the blocks (``skipped_numel`` weights) are dense
        and not counted."""
        return sum(r.sparsity * r.numel for r in self.layers) / max(self.numel, 1)

    def summary(self) -> str:
        peak = "n/a" if self.peak_bytes is None else f"{self.peak_bytes / 2**20:.1f} MiB"
        skipped = (
            f"; {len(self.skipped)} tensors in the blocks ({self.skipped_numel:,} weights) "
            "skipped, left dense"
            if self.skipped
            else ""
        )
        return (
            f"{self.method} {self.target} ({self.allocation}): sparsity {self.sparsity:.2%} of "
            f"{self.numel:,} weights in {len(self.layers)} layers of the blocks ({self.share:.1%} "
            "of the block parameters; the embeddings and the output layer are not pruned nor "
            f"counted){skipped}, {self.seconds:.2f} s, "
            f"peak memory {peak} ({self.peak_source}), calibration {self.samples} samples / "
            f"{self.tokens:,} tokens"
        )

    def table(self) -> Table:
        table = Table(title=self.summary())
        for col in ("layer", "shape", "target", "sparsity", "rel. error"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            table.add_row(r.name, shape, f"{r.target:.2%}", f"{r.sparsity:.2%}", f"{r.error:.4f}")
        for name, reason in self.skipped:
            table.add_row(name, "skipped", "", "", reason)
        for name, note in self.notes:
            table.add_row(name, "note", "", "", note)
        return table

    def block_table(self) -> Table:
        """Per block: sparsity over what was pruned, its share of the block's parameters,
        and the parameters left dense."""
        table = Table(title="blocks: pruned and dense parameters")
        for col in ("block", "pruned tensors", "sparsity", "share of block", "left dense"):
            table.add_column(col, justify="left" if col in ("block", "left dense") else "right")
        for b in self.blocks:
            table.add_row(b.name, f"{len(b.pruned)} ({b.pruned_numel:,} weights)",
                          f"{b.sparsity:.2%}", f"{b.share:.1%}",
                          ", ".join(b.dense))  # fmt: skip
        return table
