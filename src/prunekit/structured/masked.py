"""The group-masked model, computed without copying the model or most of its weights.

``verify`` compares the shrunk model with the *group-masked* one: the same model with
every position of the removed groups zero (:func:`~prunekit.structured.surgery.zero_positions`).
Copying each pruned tensor to zero its positions costs a pass over most of the weights
(ResNet-50: 25.6 M values, ~17-29 ms at 2 threads, more than a batch-1 forward's third).
For the layers whose arithmetic is known this module zeroes *activations* instead,
which computes the very same numbers:

- a ``Conv1d/2d/3d`` or ``Linear`` whose output channels ``i`` are zero (weight rows and
  bias) outputs zeros in those channels: ``y[:, i] = 0`` after it;
- one whose input channels ``j`` are zero (weight columns; ``groups=1``) ignores those
  input channels: ``x[:, j] = 0`` before it (``sum_c w[o, c] x[c]`` holds ``0`` terms
  either way);
- a ``BatchNorm1d/2d/3d`` whose ``gamma`` and ``beta`` are zero in ``i`` outputs
  ``0 * x_hat + 0 = 0`` there: ``y[:, i] = 0`` after it.

Given the removal's new tensors (:func:`~prunekit.structured.surgery.slices`, made
before the removal), such a Linear or ungrouped Conv layer computes on its kept channels
alone instead: its input narrowed to the kept channels, its output computed with the new
tensors and widened back with zeros, which is that arithmetic without its zero terms, at
the shrunk layer's cost (:func:`hooked`; the layer's parameters stay untouched, so model
code reading them elsewhere reads them as before). The check then takes those layers'
new tensors as given: what it tests there is everything around them (the graph's
positions, the other layers, the model's code on the new widths).

Only modules of exactly those types (a subclass may compute otherwise), without hooks
of their own (they would see other tensors), whose parameters have one name (a tied
tensor is used elsewhere too) and hold at least :data:`HOOKED_NUMEL` values (a hook
costs more than copying a small layer) are masked this way, and none while hooks common
to all modules are registered; every other position is zeroed in a copy of its tensor
swapped in (:func:`group_masked_tensors`, :func:`swapped`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from prunekit.structured.surgery import Slices, zero_positions

Positions = Mapping[tuple[str, int], Tensor]
_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Smaller layers are masked by copies: a hook costs ~50 us a call at 2 threads (its
# Python lets the thread pool fall asleep before the next operation); with every layer
# hooked, MobileNetV2's reference pass ran 7% slower than with copies. A hooked Conv /
# Linear computes its kept channels alone, so the threshold is lower than a copy's cost
# alone would set: pk.shrink at 4 K values was 1-3% faster than at 64 K on ResNet-50 and
# MobileNetV2 (two interleaved runs of 12 and 20 pairs; 16 K within 2% of both).
HOOKED_NUMEL = 1 << 12


def group_masked_tensors(model: nn.Module, positions: Positions) -> dict[str, Tensor]:
    """The parameters of ``model`` holding ``positions``
    (:meth:`~prunekit.structured.graph.DependencyGraph.positions`) as new tensors with
    those positions zero (a copy, then ``index_fill_``: 25% faster than one masked
    pass; ``model`` is not touched). Names are those of
    ``named_parameters(remove_duplicate=False)``; a tensor tied under several names is
    masked once, with the positions of every name."""
    params = dict(model.named_parameters(remove_duplicate=False))
    held = {id(params[name]) for name, _ in positions if name in params}
    copies: dict[int, Tensor] = {}  # one copy per tensor, however many names it has
    for p in params.values():
        if id(p) in held and id(p) not in copies:
            copies[id(p)] = p.detach().clone()  # memcpy speed; only the zeros written next
    masked = {name: copies[id(p)] for name, p in params.items() if id(p) in copies}
    zero_positions(masked, positions)
    return masked


@contextmanager
def swapped(model: nn.Module, tensors: Mapping[str, Tensor]) -> Iterator[None]:
    """``model`` computing with ``tensors`` (by parameter name) in place of its own
    parameters inside; the very parameter objects are put back on exit."""
    slots = []
    for name, tensor in tensors.items():
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        slots.append((module, attr, module._parameters[attr]))
        module._parameters[attr] = tensor  # type: ignore[assignment]
    try:
        yield
    finally:
        for module, attr, original in reversed(slots):
            module._parameters[attr] = original


@dataclass
class Masking:
    """How to compute the group-masked model: channels zeroed at module inputs and
    outputs (module name -> indices), and the positions left to masked copies."""

    inputs: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    rest: dict[tuple[str, int], Tensor] = field(default_factory=dict)


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether ``a`` and ``b`` hold the same indices (in the same order, as a family's
    members usually do, or sorted)."""
    if a is None or b is None or a.numel() != b.numel():
        return False
    return torch.equal(a, b) or torch.equal(a.sort().values, b.sort().values)


def _activation_masks(
    module: nn.Module, own: Mapping[tuple[str, int], Tensor]
) -> tuple[Tensor | None, Tensor | None] | None:
    """``(input channels, output channels)`` to zero instead of ``own`` (this module's
    positions by ``(attribute, dim)``), or None when its arithmetic does not allow it."""
    if type(module) in _NORMS:
        ok = set(own) == {("weight", 0), ("bias", 0)} and _same(own["weight", 0], own["bias", 0])
        return (None, own["weight", 0]) if ok else None
    if type(module) not in _LINEAR or not set(own) <= {("weight", 0), ("weight", 1), ("bias", 0)}:
        return None
    rows, shift = own.get(("weight", 0)), own.get(("bias", 0))
    has_bias = getattr(module, "bias", None) is not None
    if (rows is not None or shift is not None) and has_bias and not _same(rows, shift):
        return None  # rows zeroed without their bias (or the reverse): not a zero output
    if ("weight", 1) in own and getattr(module, "groups", 1) != 1:
        return None
    return own.get(("weight", 1)), rows


def masking(model: nn.Module, positions: Positions) -> Masking:
    """Split ``positions`` into activation masks (module docstring) and the rest."""
    modules, uses = {}, {}  # path -> module; id(parameter) -> how many names it has
    for path, module in model.named_modules(remove_duplicate=False):
        modules[path] = module
        for p in module._parameters.values():
            uses[id(p)] = uses.get(id(p), 0) + 1
    by_module: dict[str, dict[tuple[str, int], Tensor]] = {}
    for (name, dim), index in positions.items():
        path, _, attr = name.rpartition(".")
        if path in modules and modules[path]._parameters.get(attr) is not None:
            by_module.setdefault(path, {})[attr, dim] = index  # (buffers stay: not zeroed)
    out = Masking()
    if _global_hooks():  # they would see a layer's output before its zeros: copies only
        out.rest.update(positions)
        return out
    for path, own in by_module.items():
        module = modules[path]
        tensors = [p for p in module._parameters.values() if p is not None]
        cheap = sum(p.numel() for p in tensors) < HOOKED_NUMEL  # copying costs less
        hooked = module._forward_hooks or module._forward_pre_hooks
        single = all(uses[id(p)] == 1 for p in tensors)
        found = None if cheap or hooked or not single else _activation_masks(module, own)
        if found is None:
            out.rest.update({(f"{path}.{a}" if path else a, d): i for (a, d), i in own.items()})
            continue
        if found[0] is not None:
            out.inputs[path] = found[0]
        if found[1] is not None:
            out.outputs[path] = found[1]
    return out


def _global_hooks() -> bool:
    """Whether hooks common to all modules are registered (``register_module_forward_*``)."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _channel_dim(module: nn.Module, x: Tensor) -> int:
    """Where ``module``'s channels are in ``x``: last for Linear; for a convolution or
    a norm the first dim after the batch (unbatched convolution input: dim 0)."""
    if isinstance(module, nn.Linear):
        return x.dim() - 1
    if isinstance(module, _NORMS):
        return 1
    return x.dim() - 1 - len(module.kernel_size)  # type: ignore[arg-type]


def _zeroed(module: nn.Module, x: Tensor, index: Tensor, in_place: bool = False) -> Tensor:
    fill = x.index_fill_ if in_place else x.index_fill
    return fill(_channel_dim(module, x), index.to(x.device), 0.0)


def _narrowed(module: nn.Module, x: Tensor, kept: Tensor) -> Tensor:
    return x.index_select(_channel_dim(module, x), kept.to(x.device))


def _widened(module: nn.Module, out: Tensor, kept: Tensor, width: int) -> Tensor:
    dim = _channel_dim(module, out)
    shape = list(out.shape)
    shape[dim] = width
    return out.new_zeros(shape).index_copy_(dim, kept.to(out.device), out)


@dataclass(frozen=True)
class _Narrow:
    """A Conv / Linear layer computing on its kept channels: its kept input and output
    channels (None: all) and its new tensors (by attribute)."""

    inputs: Tensor | None
    outputs: Tensor | None
    tensors: dict[str, Tensor]


def _narrowing(model: nn.Module, found: Masking, cut: Slices | None) -> dict[str, _Narrow]:
    """The Conv / Linear layers of ``found`` whose new tensors ``cut`` holds, by path (not
    a grouped conv, whose groups fewer rows would break, nor a module whose ``forward``
    is already replaced on the instance, as accelerate's hooks do)."""
    if cut is None:
        return {}
    out: dict[str, _Narrow] = {}
    for path in dict.fromkeys([*found.inputs, *found.outputs]):
        module = model.get_submodule(path)
        names = {a: f"{path}.{a}" if path else a for a in ("weight", "bias")}
        plain = type(module) in _LINEAR and getattr(module, "groups", 1) == 1
        if plain and "forward" not in vars(module) and names["weight"] in cut.tensors:
            kept = dict(cut.kept[names["weight"]])
            tensors = {a: cut.tensors[n] for a, n in names.items() if n in cut.tensors}
            out[path] = _Narrow(kept.get(1), kept.get(0), tensors)
    return out


def _narrow_forward(module: nn.Module, narrow: _Narrow, input: Tensor) -> Tensor:
    """``module``'s forward on its kept channels, widened back with zeros (its own
    parameters untouched: model code reading them elsewhere reads them whole)."""
    x = input if narrow.inputs is None else _narrowed(module, input, narrow.inputs)
    weight = narrow.tensors["weight"]
    bias = narrow.tensors.get("bias", module.bias)
    if isinstance(module, nn.Linear):
        out = nn.functional.linear(x, weight, bias)
    else:
        out = module._conv_forward(x, weight, bias)  # type: ignore[operator]
    if narrow.outputs is None:
        return out
    return _widened(module, out, narrow.outputs, module.weight.shape[0])  # its own, whole


def _input_hook(change: Callable[[nn.Module, Tensor], Tensor]) -> Callable[..., Any]:
    """A pre-hook passing the module ``change(module, x)`` for its input ``x``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        if args:
            return (change(module, args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))  # the input passed by keyword (``input=x``)
        return args, {**kwargs, key: change(module, kwargs[key])}

    return hook


@contextmanager
def hooked(model: nn.Module, found: Masking, cut: Slices | None = None) -> Iterator[None]:
    """``model`` zeroing ``found``'s input and output channels inside (hooks removed on
    exit; the inputs are zeroed in a copy, never in the caller's tensor; the outputs,
    new tensors of the layers, in place: run it without autograd).

    With ``cut`` (the removal's :func:`~prunekit.structured.surgery.slices`), a Conv /
    Linear layer computes on its kept channels alone instead: its ``forward`` is replaced
    on the instance while inside, narrowing its input to the kept channels, computing with
    its new tensors and widening its output back with zeros. That is the zero-weight
    arithmetic without its zero terms, at the shrunk layer's cost (``pk.shrink`` on
    ResNet-50 14% faster than with these layers zeroed, MobileNetV2 3%, interleaved; the
    tensors are made once, for the removal). Its parameters stay as they are, so model
    code reading them outside its call reads what it read before."""
    narrow = _narrowing(model, found, cut)
    with ExitStack() as stack:
        for path, n in narrow.items():
            module = model.get_submodule(path)
            module.forward = partial(_narrow_forward, module, n)  # type: ignore[method-assign]
            stack.callback(delattr, module, "forward")
        for path, index in found.inputs.items():
            if path not in narrow:
                change = partial(_zeroed, index=index)
                module = model.get_submodule(path)
                hook = module.register_forward_pre_hook(_input_hook(change), with_kwargs=True)
                stack.callback(hook.remove)
        for path, index in found.outputs.items():
            if path not in narrow:
                # in place: the output is the layer's own new tensor (no autograd here)
                zero = partial(_zeroed, index=index, in_place=True)
                hook = model.get_submodule(path).register_forward_hook(
                    lambda m, args, out, zero=zero: zero(m, out)
                )
                stack.callback(hook.remove)
        yield


__all__ = ["Masking", "group_masked_tensors", "hooked", "masking", "swapped"]
