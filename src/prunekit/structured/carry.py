"""Masks through :func:`~prunekit.structured.shrink.shrink`: kept, sliced like their weights.

A model pruned with masks (``pk.prune(granularity="element")``, ``"2:4"``, filters...)
keeps them when shrunk. Each mask ``M`` of a weight ``W`` is sliced with the indices the
removal keeps of ``W`` (:func:`~prunekit.structured.surgery.kept_indices`), so
``W'[i] * M'[i] = W[k(i)] * M[k(i)]`` position by position, and registered again: the
pruned zeros stay pruned while the shrunk model fine-tunes. A mask whose zeros all lay in
removed groups (a filter mask whose filters went) is all ones once sliced and goes with
them. Only prunekit's own masks can be sliced; any other parametrization is refused
before the model changes.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunekit.errors import IncompatibleLayerError
from prunekit.masks import WeightMask, apply_mask, get_mask, tie_masks
from prunekit.structured.surgery import Cuts

Masks = dict[str, Tensor]  # module name -> bool mask of its weight (True = kept)


def masks_of(model: nn.Module) -> Masks:
    """Every prunekit mask of ``model``, by module name. Raises IncompatibleLayerError,
    changing nothing, when a tensor carries any other parametrization (it cannot be sliced).
    """
    out: Masks = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor, chain in module.parametrizations.items():
            other = [type(p).__name__ for p in chain if not isinstance(p, WeightMask)]
            if other:
                raise IncompatibleLayerError(
                    f"layer {name!r}: its {tensor} is parametrized by {', '.join(other)}, "
                    "which shrink cannot slice when channels go. Fix: fold it into a plain "
                    "weight first with torch.nn.utils.parametrize.remove_parametrizations("
                    f"model.get_submodule({name!r}), {tensor!r}) (after pk.bake(model) if "
                    "prunekit masks come before it). Nothing was changed."
                )
        mask = get_mask(module)
        if mask is not None:
            out[name] = mask
    return out


def sliced(masks: Masks, cuts: Cuts, aliases: Mapping[str, list[str]]) -> Masks:
    """``masks`` cut like their weights (``cuts`` by tensor name, ``aliases`` of tied ones);
    those left all ones (their zeros were removed groups) are left out."""
    by_name = {alias: cut for name, cut in cuts.items() for alias in aliases.get(name, [name])}
    out: Masks = {}
    for name, mask in masks.items():
        for dim, index in by_name.get(f"{name}.weight" if name else "weight", []):
            mask = mask.index_select(dim, index.to(mask.device))
        if not bool(mask.all()):
            out[name] = mask
    return out


def register(model: nn.Module, masks: Masks) -> None:
    """Register ``masks`` on the modules they name (tied weights share one mask)."""
    for name, mask in masks.items():
        apply_mask(model.get_submodule(name), mask)
    tie_masks(model)
