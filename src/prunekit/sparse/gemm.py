"""A layer's effective weight as the 2-D GEMM matrix a sparse kernel multiplies.

A ``Linear`` computes ``y = x W^T + b`` with ``W`` of shape ``(out, in)``. A ``Conv2d``
with ``groups=1`` and zero padding is the same product after im2col
(:func:`torch.nn.functional.unfold`): ``W`` reshaped to ``(out, in * kh * kw)``. The
columns run input-major (``c * kh * kw + k``, unfold's order, in which block
granularity tiles the matrix) or, with ``kernel_major=True``, kernel-major
(``k * in + c``), the order in which N:M groups of input channels are consecutive.

The effective weight is read through the mask of a masked layer
(``module.weight = original * mask``) and is the stored tensor of a baked one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


def base_type(module: nn.Module) -> type[nn.Module]:
    """The module's own class (parametrize wraps it in a ``Parametrized<Class>`` subclass)."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def unsupported(module: nn.Module) -> str | None:
    """Why ``module`` cannot run as a sparse GEMM, or None when it can."""
    cls = base_type(module)
    if cls is nn.Linear:
        return None
    if cls is nn.Conv2d:
        if module.groups != 1:
            return f"grouped Conv2d (groups={module.groups}) is not one GEMM"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"Conv2d padding {module.padding!r}/{module.padding_mode!r} is not im2col-able"
        return None
    return f"{cls.__name__} is not a Linear or an im2col-able Conv2d"


def gemm_weight(module: nn.Module, kernel_major: bool = False) -> Tensor:
    """The effective weight as ``(out, in * prod(kernel))``, detached, contiguous."""
    with torch.no_grad():
        weight = module.weight.detach()
        if kernel_major and weight.dim() > 2:
            weight = weight.movedim(1, -1)
        return weight.reshape(weight.shape[0], -1).contiguous()


def gemm_bias(module: nn.Module) -> Tensor | None:
    """A detached copy of the layer's bias, or None."""
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().clone()
