"""Shortcuts of the MAC counter: torch functions whose count follows from shapes.

:class:`prunekit.cost.MacCounter` counts by watching every aten operation a model runs
(a ``TorchDispatchMode``), and each one watched costs Python between two kernels. The
functions listed here need no watching: a convolution or a linear layer costs what
torch's own formula for the operation it runs says of its argument shapes, and the
functions of ``_NO_MACS`` (elementwise, normalisation, pooling) run no operation torch
has a formula for, so they cost 0. Counted either way, the totals are equal (a test holds
them equal to ``FlopCounterMode``'s); a call outside what a formula covers (an unbatched
convolution, a vector product, a tensor subclass) is watched as before.

=========  =============================================================================
conv       ``conv_flop(x.shape, w.shape, out_shape)`` of ``aten.convolution`` (batched input)
linear     ``mm_flop((rows, k), (k, n))``: ``rows = x.numel() / k`` (inputs of 2+ dims)
matmul     ``mm_flop((batch * m, k), (k, n))``, ``batch`` the broadcast batch (2+ dims each)
=========  =============================================================================
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import flop_registry

_PLAIN = (torch.Tensor, nn.Parameter)


def _plain(args: tuple, kwargs: dict) -> bool:
    """Whether every tensor argument is a plain tensor or parameter (a subclass may run
    other operations than the function's own)."""
    return all(type(a) in _PLAIN for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


def _always(args: tuple, kwargs: dict) -> bool:
    return True


def _pair(args: tuple, kwargs: dict, names: tuple[str, str]) -> tuple[Any, Any]:
    """The two tensor operands of a call (by position or by name; None if not tensors)."""
    a = args[0] if args else kwargs.get(names[0])
    b = args[1] if len(args) > 1 else kwargs.get(names[1])
    return (a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else (None, None)


def _conv_ready(args: tuple, kwargs: dict) -> bool:
    x, w = _pair(args, kwargs, ("input", "weight"))
    return x is not None and x.dim() == w.dim()


def _conv_flops(args: tuple, kwargs: dict) -> tuple[Any, tuple]:
    x, w = _pair(args, kwargs, ("input", "weight"))
    return _CONV_FORMULA, (x.shape, w.shape, None, None, None, None, False)


def _linear_ready(args: tuple, kwargs: dict) -> bool:
    x, _ = _pair(args, kwargs, ("input", "weight"))
    return x is not None and x.dim() >= 2


def _linear_flops(args: tuple, kwargs: dict) -> tuple[Any, tuple]:
    x, w = _pair(args, kwargs, ("input", "weight"))
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return _MM_FORMULA, ((rows, x.shape[-1]), (w.shape[-1], w.shape[0]))


def _matmul_ready(args: tuple, kwargs: dict) -> bool:
    a, b = _pair(args, kwargs, ("input", "other"))
    return a is not None and a.dim() >= 2 and b.dim() >= 2


def _matmul_flops(args: tuple, kwargs: dict) -> tuple[Any, tuple]:
    a, b = _pair(args, kwargs, ("input", "other"))
    rows = a.shape[-2]  # one (m, k) x (k, n) product per broadcast batch entry
    for size in torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]):
        rows *= size
    return _MM_FORMULA, ((rows, a.shape[-1]), (b.shape[-2], b.shape[-1]))


# torch's own shape formulas (unwrapped: they take shapes), as the counter applies them
_CONV_FORMULA = flop_registry[torch.ops.aten.convolution].__wrapped__
_MM_FORMULA = flop_registry[torch.ops.aten.mm].__wrapped__
# Torch functions whose count follows from their arguments' shapes, so the counter need
# not watch the aten operations they run: ``(ready(args, kwargs), flops(args, kwargs))``,
# ``flops`` giving the aten formula and its shape arguments. ``ready`` turns down what
# the formula does not cover (an unbatched convolution, a vector product), counted by
# watching as before. The functions of ``_NO_MACS`` run no operation with a formula
# (elementwise, normalisation, pooling); a test holds the totals equal to
# FlopCounterMode's.
_NO_MACS = (
    F.relu, F.relu6, F.hardtanh, F.hardswish, F.silu, F.gelu, F.batch_norm, F.layer_norm,
    F.group_norm, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    torch.relu, torch.relu_, torch.add, torch.mul, torch.flatten, torch.batch_norm,
    torch.Tensor.relu, torch.Tensor.relu_, torch.Tensor.add, torch.Tensor.add_,
    torch.Tensor.__add__, torch.Tensor.__iadd__, torch.Tensor.mul, torch.Tensor.__mul__,
    torch.Tensor.flatten, torch.Tensor.mean,
)  # fmt: skip
_SHORTCUTS: dict[Any, tuple[Any, Any]] = {
    **{f: (_always, None) for f in _NO_MACS},
    **{f: (_conv_ready, _conv_flops) for f in (torch.conv1d, torch.conv2d, torch.conv3d)},
    **{f: (_linear_ready, _linear_flops) for f in (F.linear,)},
    **{f: (_matmul_ready, _matmul_flops)
       for f in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)},
}  # fmt: skip


def shortcut(func: Any, args: tuple, kwargs: dict) -> tuple[Any, Any] | None:
    """``func``'s shortcut, ``(ready, flops)``, if it covers this call (plain tensors,
    arguments its formula covers); None: count the call by watching it."""
    found = _SHORTCUTS.get(func)
    if found is None or not _plain(args, kwargs) or not found[0](args, kwargs):
        return None
    return found


__all__ = ["shortcut"]
