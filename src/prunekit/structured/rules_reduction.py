"""Reduction and pooling rules.

Reductions over the channel dimension (mean, softmax, norms) mix channels, so they block
them; over other dimensions channels pass through. Pooling and resizing work per channel
on the spatial dimensions (padding: :mod:`~prunekit.structured.rules_index`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_flatten

from prunekit.structured.labels import Label
from prunekit.structured.registry import func_name
from prunekit.structured.rules_elementwise import elementwise
from prunekit.structured.state import TraceState, arg


def _dims(value: Any, ndim: int) -> list[int] | None:
    if value is None:
        return None
    dims = [value] if isinstance(value, int) else list(value)
    return [d % ndim for d in dims]


def reduction(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any
) -> None:
    """``sum``, ``mean``, ``softmax``...: mixing along the channels blocks them."""
    x = args[0]
    dim = arg(args, kwargs, *_DIM_ARG.get(func_name(func), (1, "dim")))
    if isinstance(dim, Tensor):  # torch.max(a, b): elementwise
        return elementwise(tr, func, args, kwargs, out)
    label = tr.label(x)
    if label is None:
        return
    dims = _dims(dim, x.dim())
    if dims is None or label.dim in dims:
        if not _statistic(tr, func, x, dims, out):
            tr.atoms.block(label.ids)
        return
    for o in tree_flatten(out)[0]:
        if isinstance(o, Tensor) and o.dim() > 0:
            shift = 0 if o.dim() == x.dim() else sum(d < label.dim for d in dims)
            tr.set(o, Label(label.dim - shift, label.ids))


def _statistic(tr: TraceState, func: Callable[..., Any], x: Tensor, dims: Any, out: Any) -> bool:
    """In approximate mode, a mean / variance over the last dimension kept as size 1 (a
    hand-written RMSNorm's ``x.pow(2).mean(-1, keepdim=True)``) lets the channels pass."""
    keep = isinstance(out, Tensor) and out.dim() == x.dim() and out.shape[-1] == 1
    if tr.approximate and keep and dims == [x.dim() - 1] and func_name(func) in _STATISTICS:
        tr.norms += 1
        return True
    return False


_STATISTICS = ("mean", "var", "std", "norm")
_DIM_ARG = {"norm": (2, "dim"), "linalg_vector_norm": (2, "dim"), "normalize": (2, "dim", 1)}
REDUCTION_OPS = [
    "sum",
    "mean",
    "amax",
    "amin",
    "max",
    "min",
    "var",
    "std",
    "norm",
    "linalg_vector_norm",
    "logsumexp",
    "prod",
    "softmax",
    "log_softmax",
    "argmax",
    "argmin",
    "cumsum",
    "nansum",
    "var_mean",
    "std_mean",
    "median",
    "normalize",
]


def per_channel(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any
) -> None:
    """Pooling, resizing: spatial work per channel, channels on dim 0 or 1 pass."""
    label = tr.label(args[0])
    if label is None:
        return
    if label.dim > 1:
        tr.atoms.block(label.ids)
        return
    for o in tree_flatten(out)[0]:
        if isinstance(o, Tensor) and o.dim() == args[0].dim():
            tr.set(o, label)


POOL_OPS = [
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "max_pool2d_with_indices",
    "interpolate",
    "upsample",
    "lp_pool2d",
]
