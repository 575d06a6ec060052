"""What :func:`prunekit.llm.prune` did: per-layer sparsity and error, time, peak memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table

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
            f"{self.numel:,} weights in {len(self.layers)} layers{skipped}, {self.seconds:.2f} s, "
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
        return table
