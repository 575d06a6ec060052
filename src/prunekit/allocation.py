"""Layer-wise allocation: the sparsity each layer gets under local scope.

- ``uniform``: every layer at the target sparsity.
- explicit ``{layer_name: sparsity}``: exactly those values (every selected layer named).
- ``erk`` (Erdos-Renyi-Kernel, Evci et al. 2020, RigL): density of a layer with weight
  ``(n_out, n_in, k_1, ...)`` proportional to ``(n_out + n_in + sum k) / (n_out * n_in * prod k)``,
  scaled so the overall density is ``1 - s``; layers that would exceed density 1 are
  made dense and the rest rescaled, until none does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from prunekit.errors import InvalidSparsityError, PruningError, UnknownChoiceError
from prunekit.layers import Layer

Allocation = str | Mapping[str, float]
ALLOCATIONS = ["uniform", "erk"]


def check_sparsity(value: object, where: str = "sparsity") -> float:
    """``value`` as a float in [0, 1), or :class:`InvalidSparsityError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise InvalidSparsityError(
            f"{where}={value!r} is not a fraction in [0, 1); Fix: pass e.g. 0.5 for half "
            "the weights pruned (1.0 would remove the layer entirely)."
        )
    return float(value)


def erk_densities(layers: list[Layer], sparsity: float) -> dict[str, float]:
    """ERK densities (see the module docstring) with overall density ``1 - sparsity``."""
    shapes = {layer.name: tuple(layer.canonical.shape) for layer in layers}
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / numel[name] for name, shape in shapes.items()}
    budget = (1 - sparsity) * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        remaining = budget - sum(numel[n] for n in dense)
        scale = remaining / sum(raw[n] * numel[n] for n in free) if free else 0.0
        over = [n for n in free if raw[n] * scale > 1]
        if not over:
            return {n: 1.0 if n in dense else raw[n] * scale for n in shapes}
        dense.update(over)


def allocate(
    layers: list[Layer], sparsity: float | None, allocation: Allocation
) -> dict[str, float]:
    """Per-layer target sparsity for local scope."""
    names = [layer.name for layer in layers]
    if isinstance(allocation, Mapping):
        missing = [n for n in names if n not in allocation]
        extra = [k for k in allocation if k not in names]
        if missing or extra:
            raise PruningError(
                f"allocation dict does not match the selected layers: missing {missing}, "
                f"unknown {extra}; Fix: give a sparsity for every selected layer "
                "(or select fewer layers with layers=/exclude=)."
            )
        return {n: check_sparsity(allocation[n], f"allocation[{n!r}]") for n in names}
    if allocation not in ALLOCATIONS:
        raise UnknownChoiceError("allocation", allocation, [*ALLOCATIONS, "{layer: sparsity}"])
    if sparsity is None:
        raise InvalidSparsityError(f"allocation {allocation!r} needs a target sparsity")
    if allocation == "erk":
        return {n: max(0.0, 1 - d) for n, d in erk_densities(layers, sparsity).items()}
    return dict.fromkeys(names, sparsity)
