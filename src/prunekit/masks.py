"""Masks on weights: apply, compose, bake, remove (and :func:`sparsity`, re-exported from
:mod:`prunekit.coverage`).

A mask is a ``torch.nn.utils.parametrize`` parametrization on ``weight`` holding a
packed bit mask (see :mod:`prunekit.bits`). ``module.weight`` is then
``original * mask``: the forward pass sees zeros, gradients of pruned entries are zero,
and whatever the optimizer does to ``original`` (momentum, weight decay, Adam), the
weight the model uses stays exactly zero where the mask is. Masks only compose: a new
mask is ANDed with the one in place, so sparsity never shrinks.

Saving and loading a masked model::

    torch.save(model.state_dict(), "masked.pt")         # holds original + packed mask
    fresh = build_model()
    pk.masks.load_state_dict(fresh, torch.load("masked.pt", weights_only=True))

or call :func:`bake` first and save an ordinary state dict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunekit import bits
from prunekit.coverage import SparsityReport as SparsityReport  # re-exported: pk.masks.*
from prunekit.coverage import sparsity as sparsity
from prunekit.errors import IncompatibleLayerError, PruningError
from prunekit.layers import require_model, weight_param

_MASK_KEY = ".parametrizations.weight.0.packed"  # the usual one (first in the chain)
_MASK_RE = re.compile(r"^(?:(.*)\.)?parametrizations\.weight\.\d+\.packed$")


class WeightMask(nn.Module):
    """Parametrization ``weight = original * mask`` with the mask stored one bit per weight."""

    def __init__(self, packed: Tensor, shape: torch.Size) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        self.register_buffer("packed", packed)

    def forward(self, original: Tensor) -> Tensor:
        # ``where`` allocates only the result (``original * mask.to(dtype)`` also made a
        # weight-sized float copy of the mask on every call); its gradient is the same,
        # ``mask`` for ``original``, and a pruned entry is +0.0 even where ``original``
        # is inf or NaN.
        return torch.where(self.mask(), original, 0)

    def mask(self) -> Tensor:
        """The mask as a bool tensor shaped like the weight (True = kept)."""
        return bits.unpack(self.packed, self.shape)

    def extra_repr(self) -> str:
        kept = bits.count_ones(self.packed)
        return f"shape={tuple(self.shape)}, kept={kept}/{self.shape.numel()}"


def get_mask(module: nn.Module) -> Tensor | None:
    """The bool mask on ``module.weight`` (True = kept), or None when unmasked."""
    param = mask_param(module)
    return None if param is None else param.mask()


def kept_fraction(module: nn.Module) -> float:
    """Fraction of ``module.weight`` its mask keeps (1.0 when unmasked), without unpacking."""
    param = mask_param(module)
    if param is None:
        return 1.0
    return bits.count_ones(param.packed) / max(param.shape.numel(), 1)


def mask_param(module: nn.Module) -> WeightMask | None:
    """The :class:`WeightMask` parametrization on ``module.weight``, or None when unmasked."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, WeightMask)), None)


def apply_packed(module: nn.Module, packed: Tensor) -> None:
    """AND a packed mask (storage layout of ``module.weight``) into the module's mask.

    Registers the parametrization on first use. With :func:`set_mask`, the only functions
    that mutate masks.
    """
    existing = mask_param(module)
    if existing is not None:
        existing.packed.bitwise_and_(packed)
        return
    shape = weight_param(module).shape
    # unsafe=True: the shape is ours by construction, and the safe path would compute
    # (and allocate) the masked weight once just to check it.
    parametrize.register_parametrization(
        module, "weight", WeightMask(packed.to(weight_param(module).device), shape), unsafe=True
    )


def _packed(module: nn.Module, mask: Tensor) -> Tensor:
    """``mask`` (bool, shaped like ``module``'s weight) packed; an error for another shape."""
    if mask.shape != weight_param(module).shape:
        raise PruningError(
            f"mask shape {tuple(mask.shape)} does not match the weight "
            f"{tuple(weight_param(module).shape)}; Fix: build the mask in the weight's layout."
        )
    return bits.pack(mask.to(torch.bool))


def apply_mask(module: nn.Module, mask: Tensor) -> None:
    """AND a bool mask shaped like the weight into ``module``'s mask."""
    apply_packed(module, _packed(module, mask))


def set_mask(module: nn.Module, mask: Tensor) -> None:
    """Replace ``module``'s mask by ``mask`` (bool, weight-shaped); the only way to revive
    weights a mask pruned (the at-initialisation controls shuffle masks this way)."""
    existing = mask_param(module)
    if existing is None:
        return apply_mask(module, mask)
    existing.packed.copy_(_packed(module, mask))


def copy_masks(source: nn.Module, target: nn.Module) -> None:
    """AND every mask of ``source`` into the same-named module of ``target`` (e.g. a ticket's
    masks onto a freshly initialised copy of its model)."""
    modules = dict(target.named_modules())
    for name, module in source.named_modules():
        mask = get_mask(module)
        if mask is not None:
            apply_mask(modules[name], mask)
    tie_masks(target)


def is_mask_key(key: str) -> bool:
    """True for a packed mask's state-dict key, ``<layer>.parametrizations.weight.<i>.packed``
    (``i`` > 0 when the mask follows the user's own parametrizations)."""
    return _MASK_RE.match(key) is not None


def _mask_entries(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module, str, int]]:
    """``(module name, module, tensor name, index in its chain)`` of every prunekit mask."""
    return [
        (name, module, tensor, index)
        for name, module in model.named_modules(prefix=prefix)
        if parametrize.is_parametrized(module)
        for tensor, chain in module.parametrizations.items()
        for index, p in enumerate(chain)
        if isinstance(p, WeightMask)
    ]


def _holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """``id(parameter) -> [(module name, module, attribute)]``: the modules holding each
    parameter directly (a tied weight has several; a parametrized original is held by its
    parametrization list, left out)."""
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, parametrize.ParametrizationList):
            for attr, param in module._parameters.items():
                if param is not None:
                    out.setdefault(id(param), []).append((name, module, attr))
    return out


def tie_masks(model: nn.Module) -> None:
    """Tied weights stay tied: one :class:`WeightMask` per tensor, shared by every module
    using it (``lm_head.weight is embed.weight``; two Linears holding one Parameter).

    Masks on the same original merge into one (their AND), and every other module holding
    the original gets that same mask registered, so no user of the tensor sees a dense,
    untied copy. Every function here that registers masks for a model calls it.
    """
    shared: dict[int, WeightMask] = {}
    for _, module, tensor, index in _mask_entries(model):
        chain = module.parametrizations[tensor]
        first = shared.setdefault(id(chain.original), chain[index])
        if first is not chain[index]:
            first.packed.bitwise_and_(chain[index].packed)
            chain[index] = first
    if not shared:
        return
    for key, holders in _holders(model).items():
        for _, module, attr in holders if key in shared else []:
            parametrize.register_parametrization(module, attr, shared[key], unsafe=True)


def _drop(module: nn.Module, tensor: str, index: int) -> None:
    """Remove entry ``index`` (prunekit's mask) of ``module``'s chain on ``tensor``; the
    user's own parametrizations stay, in order."""
    chain = module.parametrizations[tensor]
    if len(chain) > 1:
        del chain[index]
        return
    # torch's deepcopy of a parametrized module shares its generated class, and removal
    # deletes the property from that class, which would break every copy. Give the module
    # a private class first.
    cls = type(module)
    own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)
    parametrize.remove_parametrizations(module, tensor, leave_parametrized=False)


def _check_bakeable(entries: list[tuple[str, nn.Module, str, int]]) -> None:
    for name, module, tensor, index in entries:
        user = ", ".join(type(p).__name__ for p in list(module.parametrizations[tensor])[:index])
        if user:
            raise IncompatibleLayerError(
                f"layer {name!r}: its {tensor} is {user}(original) * mask (the mask came after "
                f"your {user}); no original gives that {tensor} without the mask, so baking "
                "would change what the model computes. Fix: keep the masks (model.state_dict() "
                "saves them, pk.masks.load_state_dict loads them), or fold both into a plain "
                "weight with torch.nn.utils.parametrize.remove_parametrizations(model."
                f"get_submodule({name!r}), {tensor!r}) (that drops {user}). Nothing was changed."
            )


def require_bakeable(model: nn.Module, prefix: str = "") -> None:
    """Raise what :func:`bake` would raise for ``model`` (module names start with
    ``prefix``), changing nothing."""
    _check_bakeable(_mask_entries(model, prefix))


def bake(model: nn.Module) -> nn.Module:
    """Write the zeros into every masked weight and remove the masks (in place).

    With ``weight = P(original * mask)`` (a mask alone, or your own parametrization ``P``
    registered after it) the zeros go into ``original`` and ``P`` stays: the model
    computes exactly what it did. With ``weight = P(original) * mask`` no original gives
    that weight without the mask, so :class:`IncompatibleLayerError` names the layer and
    the fix before anything changes. Tied weights stay tied (the zeros go into the one
    shared tensor). Returns ``model`` so calls chain.
    """
    require_model(model)
    entries = _mask_entries(model)
    _check_bakeable(entries)
    for _, module, tensor, _ in entries:
        chain = module.parametrizations[tensor]
        with torch.no_grad():
            chain.original.masked_fill_(~chain[0].mask(), 0)
        _drop(module, tensor, 0)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Drop every mask and restore the original, unpruned weights (in place). Only
    prunekit's masks go: your own parametrizations (spectral_norm, orthogonal...) stay."""
    require_model(model)
    for _, module, tensor, index in _mask_entries(model):
        _drop(module, tensor, index)
    return model


def _expected_shapes(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, tuple]:
    """The keys and shapes ``model``'s state dict will have once the masks named in
    ``state_dict`` are registered and tied (computed, nothing registered). A mask for a
    module the model lacks is left out (it shows as an unexpected key)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    modules, holders = dict(model.named_modules()), _holders(model)
    for key in state_dict:
        found = _MASK_RE.match(key)
        name = (found.group(1) or "") if found else ""
        module = modules.get(name) if found else None
        if module is None or not hasattr(module, "weight") or mask_param(module) is not None:
            continue
        param = weight_param(module)
        # the mask goes on every holder of the tensor (tied), and after the user's own
        # parametrizations on the module itself
        targets = [(holder, attr, 0) for holder, _, attr in holders.get(id(param), [])]
        if parametrize.is_parametrized(module, "weight"):
            targets.append((name, "weight", len(module.parametrizations.weight)))
        for holder, attr, index in targets:
            prefix = f"{holder}." if holder else ""
            expected.pop(f"{prefix}{attr}", None)
            expected[f"{prefix}parametrizations.{attr}.original"] = tuple(param.shape)
            expected[f"{prefix}parametrizations.{attr}.{index}.packed"] = (
                (math.prod(param.shape) + 7) // 8,
            )
    return expected


def state_mismatch(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """What keeps ``state_dict`` (masks included) from loading strictly into ``model``:
    missing and unexpected keys, mismatched shapes; empty when it loads. Touches nothing."""
    if not isinstance(state_dict, Mapping):
        return [f"state_dict={state_dict!r:.80} is a {type(state_dict).__name__}, not a mapping"]
    odd = [k for k, v in state_dict.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if odd:
        return [f"the values of {odd[:4]} are not tensors under str names"]
    expected = _expected_shapes(model, state_dict)
    missing = [k for k in expected if k not in state_dict]
    problems = [f"missing keys {missing[:4]}"] if missing else []
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:4]}")
    custom = _custom_loaders(model)
    problems += [
        f"{k}: checkpoint {tuple(v.shape)} vs model {expected[k]}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k] and k.rpartition(".")[0] not in custom
    ]
    return problems


def _custom_loaders(model: nn.Module) -> set[str]:
    """Modules that load their own state (``_load_from_state_dict`` overridden, e.g. the
    sparse formats, whose buffers take the saved sizes): their shapes are theirs to check."""
    base = nn.Module._load_from_state_dict
    return {n for n, m in model.named_modules() if type(m)._load_from_state_dict is not base}


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a state dict saved from a masked model into an unmasked ``model``.

    All or nothing: the keys and shapes are checked first (:func:`state_mismatch`), then
    an (all-kept) mask is registered on every layer whose packed mask is in
    ``state_dict`` and everything is loaded strictly, so the masks, originals and other
    tensors all arrive. On a mismatch the model is left as it was.
    """
    require_model(model)
    problems = state_mismatch(model, state_dict)
    if problems:
        raise PruningError(
            f"the state dict does not match the model: {'; '.join(problems)}; Fix: load the "
            "model.state_dict() of the architecture (and masks) it was saved from."
        )
    modules = dict(model.named_modules())
    for key in state_dict:
        found = _MASK_RE.match(key)
        module = modules[found.group(1) or ""] if found else None
        if module is not None and mask_param(module) is None:
            apply_mask(module, torch.ones(weight_param(module).shape, dtype=torch.bool))
    tie_masks(model)
    model.load_state_dict(state_dict)
