"""Which modules prunekit can prune, and how each one's weight maps to one canonical layout.

Every prunable weight is seen as ``(out, in, *kernel)`` -- output units first, then the
reduction (input) axis, then kernel positions -- whatever its storage layout:

=========================  ==========================  ===========================
module                     stored weight               canonical view
=========================  ==========================  ===========================
``nn.Linear``              ``(out, in)``               ``(out, in)``
``nn.ConvNd`` (any groups) ``(out, in/groups, *k)``    same
``nn.ConvTranspose2d``     ``(in, out/groups, kh, kw)``  transpose(0, 1)
``nn.Embedding``           ``(num, dim)``              ``(num, dim)`` (rows = tokens)
transformers ``Conv1D``    ``(in, out)``               transpose(0, 1)
=========================  ==========================  ===========================

The canonical view is always a *view* of the stored tensor (no copy), so masks computed
on it are written back with the inverse permutation.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunekit.errors import InvalidWeightError, NoLayersError, PruningError


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D; matched by name so that transformers stays optional.
    # The MRO, not the class name: a masked Conv1D is a parametrize subclass of it.
    return hasattr(module, "nf") and any(c.__name__ == "Conv1D" for c in type(module).__mro__)


def _transposed(module: nn.Module) -> bool:
    return isinstance(module, nn.ConvTranspose2d) or _is_hf_conv1d(module)


SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose2d,
    nn.Embedding,
)


def is_prunable(module: nn.Module) -> bool:
    """True for the module types prunekit prunes (see the table in this module's docstring)."""
    return isinstance(module, SUPPORTED_TYPES) or _is_hf_conv1d(module)


def weight_param(module: nn.Module) -> Tensor:
    """The stored weight parameter (the unmasked original when a mask is registered)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def to_canonical(module: nn.Module, tensor: Tensor) -> Tensor:
    """View a weight-shaped tensor in the canonical ``(out, in, *kernel)`` layout."""
    return tensor.transpose(0, 1) if _transposed(module) else tensor


def from_canonical(module: nn.Module, tensor: Tensor) -> Tensor:
    """Inverse of :func:`to_canonical` (both are a transpose or the identity)."""
    return to_canonical(module, tensor)


def kernel_ndim(module: nn.Module) -> int:
    """Number of kernel dimensions of the canonical weight (0 for Linear-like layers)."""
    return weight_param(module).dim() - 2


@dataclass(frozen=True)
class Layer:
    """A prunable module with its qualified name."""

    name: str
    module: nn.Module

    @property
    def weight(self) -> Tensor:
        return weight_param(self.module)

    @property
    def canonical(self) -> Tensor:
        return to_canonical(self.module, self.weight)

    @property
    def kind(self) -> str:
        cls = type(self.module)
        if parametrize.is_parametrized(self.module):
            cls = cls.__bases__[0]  # parametrize subclasses the module's own class
        return cls.__name__


Selector = str | type | Sequence[str | type] | Callable[[str, nn.Module], bool] | None


def _matches(name: str, module: nn.Module, item: str | type) -> bool:
    if isinstance(item, type):
        return isinstance(module, item)
    return fnmatch.fnmatchcase(name, item)


def _selector_predicate(selector: Selector) -> Callable[[str, nn.Module], bool]:
    if selector is None:
        return lambda name, module: True
    if callable(selector) and not isinstance(selector, type):
        return selector
    items = [selector] if isinstance(selector, str | type) else list(selector)
    return lambda name, module: any(_matches(name, module, it) for it in items)


def select_layers(
    model: nn.Module, layers: Selector = None, exclude: Selector = None
) -> list[Layer]:
    """The prunable layers of ``model`` chosen by ``layers`` and not by ``exclude``.

    A selector is a name or glob pattern (``"features.*"``), a module type (``nn.Conv2d``),
    a list mixing both, or a predicate ``f(name, module) -> bool``. ``None`` for ``layers``
    means every prunable layer; ``None`` for ``exclude`` excludes nothing.

    Raises:
        NoLayersError: when nothing prunable matches.
    """
    keep = _selector_predicate(layers)
    drop = _selector_predicate(exclude) if exclude is not None else (lambda n, m: False)
    chosen = [
        Layer(name, module)
        for name, module in model.named_modules()
        if is_prunable(module) and keep(name, module) and not drop(name, module)
    ]
    if not chosen:
        available = [n for n, m in model.named_modules() if is_prunable(m)]
        raise NoLayersError(
            f"no prunable layer matched layers={layers!r} exclude={exclude!r}; "
            f"prunable layers of this model: {available[:20] or 'none'}"
            + ("..." if len(available) > 20 else "")
            + ". Fix: pass names or glob patterns from that list, module types, or a predicate."
        )
    return chosen


def check_weight(layer: Layer) -> None:
    """Raise :class:`InvalidWeightError` for a non-float weight or one holding NaN / inf."""
    w = layer.weight
    if not isinstance(w, Tensor) or not torch.is_floating_point(w):
        raise InvalidWeightError(
            f"layer {layer.name!r} ({layer.kind}) has a weight of type "
            f"{getattr(w, 'dtype', type(w).__name__)}; prunekit prunes floating-point weights. "
            "Fix: exclude this layer, or dequantize it first."
        )
    # A sum is finite iff no element is NaN/inf (bar overflow, which the exact check clears).
    if not bool(torch.isfinite(w.detach().sum())) and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise InvalidWeightError(
            f"layer {layer.name!r} has {bad} NaN/inf weight value(s); scores would be "
            "meaningless. Fix: repair the weights (check the training run) or exclude the layer."
        )


def require_unique_modules(layers: Iterable[Layer]) -> None:
    """Tied weights (one module reachable under two names) would be pruned twice."""
    seen: dict[int, str] = {}
    for layer in layers:
        if id(layer.weight) in seen:
            raise PruningError(
                f"layers {seen[id(layer.weight)]!r} and {layer.name!r} share one weight tensor; "
                "Fix: select only one of them."
            )
        seen[id(layer.weight)] = layer.name


@contextmanager
def layer_hooks(layers: list[Layer], fn: Callable[[Layer, Tensor, Tensor], None]) -> Iterator[None]:
    """Call ``fn(layer, input, output)`` on every forward of each layer while open."""
    handles = [
        ly.module.register_forward_hook(lambda m, args, out, ly=ly: fn(ly, args[0], out))
        for ly in layers
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
