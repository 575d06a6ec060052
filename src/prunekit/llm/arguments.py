"""The plain arguments of :func:`prunekit.llm.prune`, checked at entry before anything runs.

:class:`PruneArguments` is a :class:`~prunekit.spec.Settings`: each field declares its rule
once, and a bad value raises :class:`~prunekit.errors.UsageError` naming the argument, the
value and what is accepted (e.g. ``PruneArguments.owl_m=True is not a finite real number
> 0; Fix: pass a finite real number > 0 (the paper's 5).``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from prunekit.errors import UsageError
from prunekit.spec import Constraint, Settings

MAX_BATCH = 2**31


def _real(low: float, high: float, *, open_low: bool, default: str) -> Constraint:
    """A finite ``int`` / ``float`` (not a bool, not a tensor) in ``(low, high)`` or
    ``[low, high)``."""
    bound = f"{'>' if open_low else '>='} {low:g}" + (f" and < {high:g}" if high < math.inf else "")

    def check(value: Any) -> float:
        real = isinstance(value, int | float) and not isinstance(value, bool)
        number = float(value) if real and abs(value) < 2**1000 else math.nan
        above = number > low or (not open_low and number == low)
        if not (math.isfinite(number) and above and number < high):
            raise UsageError(f"is not a finite real number {bound}")
        return number

    return Constraint(check, f"a finite real number {bound} ({default})")


def _count(low: int, high: int) -> Constraint:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UsageError(f"is not an int in {low}..{high:,}")
        return value

    return Constraint(check, f"an int in {low}..{high:,} (e.g. 8)")


def _blocks(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise UsageError(f"is a {type(value).__name__}, not the qualified name of a layer list")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"is a {type(value).__name__}, not a bool")
    return value


@dataclass(frozen=True)
class PruneArguments(Settings):
    """``owl_m``, ``owl_lambda``, ``blocks``, ``batch_size``, ``progress``, ``keep_masks`` of
    :func:`prunekit.llm.prune` (see there), validated at construction."""

    owl_m: float = 5.0
    owl_lambda: float = 0.08
    blocks: str | None = None
    batch_size: int = 8
    progress: bool = True
    keep_masks: bool = False

    constraints: ClassVar = {
        "owl_m": _real(0.0, math.inf, open_low=True, default="the paper's 5"),
        "owl_lambda": _real(0.0, 0.5, open_low=False, default="the paper's 0.08"),
        "blocks": Constraint(_blocks, "None or a name such as 'model.layers'"),
        "batch_size": _count(1, MAX_BATCH),
        "progress": Constraint(_flag, "True or False"),
        "keep_masks": Constraint(_flag, "True or False"),
    }
