"""Elementwise rules: broadcasting operations (add, mul, activations, ...).

Operands are aligned by broadcasting and united position by position; an unlabelled
operand that does not broadcast along the channel dimension fixes those channels
(``x + f(x)`` with ``x`` an input).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from prunekit.structured.labels import Label
from prunekit.structured.state import TraceState, tensors


def elementwise(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any
) -> None:
    """Broadcasting operation: channels at the same position are the same channel."""
    outs = tensors(out)
    if not outs:
        return
    ndim = outs[0].dim()
    result: Label | None = None
    unlabelled: list[Tensor] = []
    for t in tensors((args, kwargs)):
        label = tr.label(t)
        if label is None:
            unlabelled.append(t)
            continue
        aligned = Label(label.dim + ndim - t.dim(), label.ids)
        if result is None:
            result = aligned
        elif aligned.dim == result.dim:
            tr.atoms.unite(result.ids, aligned.ids)
        else:  # channels along different dimensions: keep both whole
            tr.atoms.block(result.ids)
            tr.atoms.block(aligned.ids)
    if result is None:
        return
    for t in unlabelled:
        at = result.dim - (ndim - t.dim())
        if at >= 0 and t.shape[at] > 1:  # a fixed-size operand along the channels
            tr.atoms.block(result.ids)
    for o in outs:
        if o.dim() == ndim:
            tr.set(o, result)


ELEMENTWISE_OPS = [
    "add",
    "add_",
    "__add__",
    "__radd__",
    "__iadd__",
    "sub",
    "sub_",
    "__sub__",
    "__rsub__",
    "__isub__",
    "rsub",
    "mul",
    "mul_",
    "__mul__",
    "__rmul__",
    "__imul__",
    "div",
    "div_",
    "__truediv__",
    "__rtruediv__",
    "__itruediv__",
    "true_divide",
    "neg",
    "__neg__",
    "pow",
    "__pow__",
    "__rpow__",
    "abs",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "square",
    "reciprocal",
    "sin",
    "cos",
    "tanh",
    "tanh_",
    "sigmoid",
    "sigmoid_",
    "relu",
    "relu_",
    "relu6",
    "gelu",
    "silu",
    "mish",
    "elu",
    "selu",
    "celu",
    "leaky_relu",
    "hardswish",
    "hardsigmoid",
    "hardtanh",
    "hardtanh_",
    "softplus",
    "erf",
    "clamp",
    "clamp_",
    "clip",
    "clamp_min",
    "maximum",
    "minimum",
    "where",
    "masked_fill",
    "masked_fill_",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "sign",
    "lerp",
    "addcmul",
    "addcdiv",
    "copy_",
]
# the in-place form of every named operation (``exp_``, ``lerp_``...): the same rule
ELEMENTWISE_OPS += [
    f"{name}_" for name in ELEMENTWISE_OPS
    if not name.startswith("_") and not name.endswith("_") and f"{name}_" not in ELEMENTWISE_OPS
]  # fmt: skip
