"""What :func:`~prunekit.structured.shrink.shrink` decided and measured: per-family
decisions and the :class:`ShrinkReport` (sizes before and after, why groups went)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rich.table import Table

from prunekit.structured.surgery import AttributeChange
from prunekit.tables import TableReport


@dataclass(frozen=True)
class FamilyDecision:
    name: str
    kind: str
    total: int
    removed: tuple[int, ...]
    note: str = ""

    @property
    def kept(self) -> int:
        return self.total - len(self.removed)


def summary(
    decisions: list[FamilyDecision],
    ratio: float | Mapping[str, float] | None,
    criterion: str,
    scope: str,
) -> str:
    """What was removed and why: ``"removed the 12 masked groups"`` (``ratio=None``) or
    ``"removed 50% of each family's groups by l2 (12 groups)"``."""
    count = sum(len(d.removed) for d in decisions)
    noun = "group" if count == 1 else "groups"
    if ratio is None:
        return f"removed the {count} masked {noun} (all-zero weights)"
    if isinstance(ratio, Mapping):
        how = "per-family ratios " + ", ".join(f"{k}: {v:.0%}" for k, v in ratio.items())
    elif scope == "global":
        how = f"{ratio:.0%} of all groups (global)"
    else:
        how = f"{ratio:.0%} of each family's groups"
    return f"removed {how} by {criterion} ({count} {noun})"


@dataclass
class ShrinkReport(TableReport):
    """Sizes before and after, and what was removed from each family. Both MAC counts come
    from :func:`prunekit.cost.count_macs`, taken the same way."""

    text_width = 120

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    families: list[FamilyDecision]
    attributes: list[AttributeChange]
    notes: list[str] = field(default_factory=list)
    # max |y_shrunk - y_reference| / output scale measured by verify (None: not verified);
    # the reference is the group-masked model (exact) or the original one (approximate)
    deviation: float | None = None
    exact: bool = True  # False: approximate=True, the outputs deviate by ``deviation``
    summary: str = ""  # what was removed and why (:func:`summary`)

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def table(self) -> Table:
        table = Table(
            title="prunekit shrink" + (f": {self.summary}" if self.summary else ""),
            caption=f"params {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_ratio:.2f}x), MACs {self.macs_before:,} -> {self.macs_after:,} "
            f"({self.macs_ratio:.2f}x)" + "".join(f"\n{n}" for n in self.notes),
        )
        for col in ("family", "kind", "kept / total", "note"):
            table.add_column(col, justify="right" if col == "kept / total" else "left")
        for f in self.families:
            table.add_row(f.name, f.kind, f"{f.kept} / {f.total}", f.note)
        return table
