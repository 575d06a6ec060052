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

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune
from torch.nn.utils.weight_norm import WeightNorm

from prunekit.errors import IncompatibleLayerError, InvalidWeightError, NoLayersError, PruningError

META_FIX = (
    "on the meta device (a shape without values); Fix: materialise it first "
    "(model.to_empty(device='cpu') then load_state_dict, or from_pretrained without a meta "
    "device_map)."
)


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
        chain = module.parametrizations.weight
        if not hasattr(chain, "original"):  # several originals: weight_norm's g and v
            raise IncompatibleLayerError(
                f"{type(module).__name__} layer's weight is computed from several tensors "
                f"({', '.join(n for n, _ in chain.named_parameters(recurse=False))}) by "
                f"{', '.join(type(p).__name__ for p in chain)}, so it has no single weight to "
                "prune; Fix: torch.nn.utils.parametrize.remove_parametrizations(module, "
                "'weight') first, or exclude the layer."
            )
        return chain.original
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
Predicate = Callable[[str, nn.Module], bool]
_SELECTOR_FIX = (
    "a name or glob pattern ('features.*'), an nn.Module type (nn.Conv2d), a list of those, "
    "or a predicate f(name, module) -> bool"
)


def require_model(model: object, role: str = "model", *, real: bool = False) -> nn.Module:
    """``model`` itself, or :class:`PruningError` when it is not an ``nn.Module``; with
    ``real``, :class:`InvalidWeightError` when a tensor of it is on the meta device."""
    if not isinstance(model, nn.Module):
        raise PruningError(
            f"{role}={model!r} ({type(model).__name__}) is not a torch nn.Module; Fix: pass the "
            "model itself (e.g. the result of from_pretrained, or your nn.Module instance)."
        )
    tensors = (*model.named_parameters(), *model.named_buffers()) if real else ()
    meta = next((name for name, t in tensors if t.is_meta), None)
    if meta is not None:
        raise InvalidWeightError(f"{role} tensor {meta!r} is {META_FIX}")
    return model


def _is_item(item: object) -> bool:
    return isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))


def _items(selector: Selector, role: str) -> list[str | type] | None:
    """The names / patterns / types of ``selector`` (None for a predicate), checked."""
    if selector is None:
        return []
    if _is_item(selector):
        return [selector]  # type: ignore[list-item]
    if callable(selector) and not isinstance(selector, type):
        return None
    if isinstance(selector, list | tuple | set | frozenset):
        bad = [item for item in selector if not _is_item(item)]
        if not bad:
            return list(selector)
        raise PruningError(
            f"{role}={selector!r} holds {bad[0]!r} ({type(bad[0]).__name__}), which is not a "
            f"layer name, pattern or nn.Module type; Fix: pass {_SELECTOR_FIX}."
        )
    raise PruningError(
        f"{role}={selector!r} ({type(selector).__name__}) is not a layer selector; "
        f"Fix: pass {_SELECTOR_FIX}."
    )


def _matches(name: str, module: nn.Module, item: str | type) -> bool:
    if isinstance(item, type):
        return isinstance(module, item)
    return fnmatch.fnmatchcase(name, item)


def _guarded(predicate: Predicate, role: str) -> Predicate:
    """``predicate`` with its own exceptions re-raised as :class:`PruningError` naming it."""

    def call(name: str, module: nn.Module) -> bool:
        try:
            return bool(predicate(name, module))
        except Exception as err:
            raise PruningError(
                f"the {role}= predicate {getattr(predicate, '__name__', predicate)!r} raised "
                f"{type(err).__name__}: {err} on layer {name!r}; Fix: make it return True or "
                "False for every (name, module)."
            ) from err

    return call


def _predicate(selector: Selector, items: list[str | type] | None, role: str) -> Predicate:
    if items is None:
        return _guarded(selector, role)  # type: ignore[arg-type]
    return lambda name, module: any(_matches(name, module, it) for it in items)


def _available(names: list[str]) -> str:
    more = "..." if len(names) > 20 else ""
    return f"prunable layers of this model: {names[:20] or 'none'}{more}"


def _unmatched_hint(model: nn.Module, item: str | type, names: list[str]) -> str:
    """Why ``item`` matched no prunable layer, with the closest candidates."""
    if isinstance(item, type):
        if not any(issubclass(item, t) for t in SUPPORTED_TYPES):
            return f"prunekit does not prune {item.__name__} layers"
        return f"this model has no {item.__name__}"
    if not any(c in item for c in "*?["):
        try:
            found = type(model.get_submodule(item)).__name__
        except AttributeError:
            found = None
        inside = any(n.startswith(f"{item}.") for n in names)
        if found is not None:
            where = f"its layers match '{item}.*'" if inside else "prunekit does not prune it"
            return f"{item!r} is a {found}, not a prunable layer ({where})"
    close = difflib.get_close_matches(item, names, n=3, cutoff=0.6)
    return f"did you mean {' or '.join(map(repr, close))}?" if close else "no close match"


def _check_matched(
    model: nn.Module, prunable: list[Layer], selector: Selector, items: list, role: str
) -> None:
    """Every name, pattern and type of ``selector`` must match a prunable layer: a typo
    must not silently select (or fail to exclude) the wrong layers."""
    names = [ly.name for ly in prunable]
    for item in items:
        if any(_matches(ly.name, ly.module, item) for ly in prunable):
            continue
        where = f"{role}={selector!r}" + (f" (entry {item!r})" if len(items) > 1 else "")
        raise NoLayersError(
            f"no prunable layer matched {where}: {_unmatched_hint(model, item, names)}; "
            f"{_available(names)}. Fix: pass names or glob patterns from that list, module "
            "types, or a predicate."
        )


def select_layers(
    model: nn.Module, layers: Selector = None, exclude: Selector = None
) -> list[Layer]:
    """The prunable layers of ``model`` chosen by ``layers`` and not by ``exclude``.

    A selector is a name or glob pattern (``"features.*"``), a module type (``nn.Conv2d``),
    a list mixing both, or a predicate ``f(name, module) -> bool``. ``None`` for ``layers``
    means every prunable layer; ``None`` for ``exclude`` excludes nothing. Every name,
    pattern and type must match at least one prunable layer (a typo is an error listing
    the close matches, never a silent no-op); a predicate is the caller's code and may
    match nothing in ``exclude``.

    Raises:
        NoLayersError: when nothing prunable matches, or one entry matches nothing.
        PruningError: a selector of the wrong type, or a predicate that raised.
    """
    require_model(model)
    keep_items, drop_items = _items(layers, "layers"), _items(exclude, "exclude")
    prunable = [Layer(n, m) for n, m in model.named_modules() if is_prunable(m)]
    _check_matched(model, prunable, layers, keep_items or [], "layers")
    _check_matched(model, prunable, exclude, drop_items or [], "exclude")
    keep = _predicate(layers, keep_items, "layers") if layers is not None else None
    drop = _predicate(exclude, drop_items, "exclude")
    chosen = [
        ly
        for ly in prunable
        if (keep is None or keep(ly.name, ly.module)) and not drop(ly.name, ly.module)
    ]
    if not chosen:
        raise NoLayersError(
            f"no prunable layer matched layers={layers!r} exclude={exclude!r}; "
            f"{_available([ly.name for ly in prunable])}. Fix: pass names or glob patterns "
            "from that list, module types, or a predicate."
        )
    return chosen


def _hook_owner(module: nn.Module) -> str | None:
    """Why ``module.weight`` is not a parameter: the torch utility that recomputes it."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.BasePruningMethod):
            return (
                "carries torch.nn.utils.prune masks (weight_orig / weight_mask); Fix: make them "
                "permanent with torch.nn.utils.prune.remove(module, 'weight') first (prunekit's "
                "masks then compose on the zeros), or exclude the layer."
            )
        if isinstance(hook, WeightNorm):
            return (
                "uses torch.nn.utils.weight_norm (its weight is recomputed from weight_g / "
                "weight_v on every call); Fix: fold it with torch.nn.utils.remove_weight_norm"
                "(module) first, or exclude the layer."
            )
    return None


def foreign_parametrizations(module: nn.Module) -> list[str]:
    """Class names of the parametrizations on ``module.weight`` prunekit did not register
    (spectral_norm, orthogonal, weight_norm...); prunekit's own mask is ``WeightMask``."""
    if not parametrize.is_parametrized(module, "weight"):
        return []
    own = ("prunekit.masks", "WeightMask")  # by name: masks imports this module
    chain = module.parametrizations.weight
    return [type(p).__name__ for p in chain if (type(p).__module__, type(p).__name__) != own]


def layer_incompatibility(layer: Layer) -> str | None:
    """Why prunekit cannot mask ``layer``'s weight at all (None when it can): the weight is
    recomputed by a torch utility, carries someone else's parametrization, or is empty."""
    module = layer.module
    if not parametrize.is_parametrized(module, "weight") and "weight" not in module._parameters:
        return _hook_owner(module) or (
            "its weight is not a parameter (something recomputes it); Fix: exclude the layer."
        )
    foreign = foreign_parametrizations(module)
    if foreign:
        return (
            f"its weight carries a parametrization prunekit did not register "
            f"({', '.join(foreign)}): a mask on top of it could not be baked, and scores would "
            "read the raw original. Fix: fold it first with torch.nn.utils.parametrize."
            "remove_parametrizations(module, 'weight'), or exclude the layer."
        )
    if not isinstance(layer.weight, Tensor):
        return "it has no weight tensor; Fix: exclude the layer."
    if layer.weight.numel() == 0:
        return f"its weight is empty (shape {tuple(layer.weight.shape)}); Fix: exclude the layer."
    return None


def check_weight(layer: Layer) -> None:
    """Raise for a weight prunekit cannot mask: :class:`IncompatibleLayerError` for the
    reasons of :func:`layer_incompatibility`, :class:`InvalidWeightError` for a weight on
    the meta device, a non-float weight or one holding NaN / inf."""
    reason = layer_incompatibility(layer)
    if reason is not None:
        raise IncompatibleLayerError(f"layer {layer.name!r} ({layer.kind}): {reason}")
    w = layer.weight
    if not isinstance(w, Tensor) or not torch.is_floating_point(w):
        raise InvalidWeightError(
            f"layer {layer.name!r} ({layer.kind}) has a weight of type "
            f"{getattr(w, 'dtype', type(w).__name__)}; prunekit prunes floating-point weights. "
            "Fix: exclude this layer, or dequantize it first."
        )
    if w.is_meta:
        raise InvalidWeightError(f"layer {layer.name!r} ({layer.kind}) has its weight {META_FIX}")
    # A sum is finite iff no element is NaN/inf (bar overflow, which the exact check clears).
    if not bool(torch.isfinite(w.detach().sum())) and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise InvalidWeightError(
            f"layer {layer.name!r} has {bad} NaN/inf weight value(s); scores would be "
            "meaningless. Fix: repair the weights (check the training run) or exclude the layer."
        )


def require_unique_modules(layers: Iterable[Layer]) -> None:
    """Tied weights (one tensor under two layer names) are pruned once: every user of the
    tensor shares its one mask (:func:`prunekit.masks.tie_masks`), so selecting two of them
    would prune it twice."""
    seen: dict[int, str] = {}
    for layer in layers:
        if id(layer.weight) in seen:
            raise PruningError(
                f"layers {seen[id(layer.weight)]!r} and {layer.name!r} share one weight tensor "
                "(tied weights); prunekit prunes the tensor once and every layer using it shares "
                f"its mask. Fix: select only one of them (e.g. exclude=[{layer.name!r}])."
            )
        seen[id(layer.weight)] = layer.name


def skipped_tensors(model: nn.Module, covered: Iterable[Tensor]) -> list[tuple[str, str, int]]:
    """``(name, reason, numel)`` of every parameter of 2 or more dimensions outside
    ``covered`` (the parameters of the layers a prune handles or skips by name): fused
    MoE expert tensors ``(experts, out, in)``, routers, raw projection parameters -- what
    a prune leaves dense without a layer to report it under."""
    done = {id(t) for t in covered}
    return [
        (
            name,
            f"{param.dim()}-D parameter {'x'.join(map(str, param.shape))} of "
            f"{type(model.get_submodule(name.rpartition('.')[0])).__name__}, not the weight of "
            "a Linear / Conv / Embedding layer: left dense",
            param.numel(),
        )
        for name, param in model.named_parameters()
        if param.dim() >= 2 and id(param) not in done
    ]


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
