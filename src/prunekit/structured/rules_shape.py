"""Shape rules: data movement (view, permute, cat, split, slicing...) moves the labels.

The same operation applied to the per-element labels gives the output's labels, whatever
the operation does. Copies and conversions keep labels; operations that read values out
of Python (``.item()``) keep every channel they read; metadata queries need no rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from prunekit.structured.registry import func_name
from prunekit.structured.state import TraceState, arg, tensors


def shape(tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    """Apply ``func`` to the labels themselves: data movement moves labels the same way."""

    def to_labels(x: Any) -> Any:
        if isinstance(x, Tensor) and (x.is_floating_point() or tr.label(x) is not None):
            return tr.full(x)
        return x

    labels = func(*tree_map(to_labels, args), **tree_map(to_labels, kwargs))
    for o, lab in zip(tree_flatten(out)[0], tree_flatten(labels)[0], strict=True):
        if isinstance(o, Tensor) and isinstance(lab, Tensor) and o.shape == lab.shape:
            tr.set_full(o, lab)
    if func_name(func) in ("chunk", "split") and isinstance(out, tuple | list):
        _equal_pieces(tr, list(out))


def concat(tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    """``cat`` along a dimension that is not the channels' (a class token before the patch
    tokens): the pieces' channels at the same position are one channel. Along the
    channels, or with pieces labelled along different dimensions: the generic rule."""
    pieces = [t for t in args[0] if t.numel()]  # cat skips empty pieces (a fresh KV cache)
    dim, labels = arg(args, kwargs, 1, "dim", 0), [tr.label(t) for t in pieces]
    dims = {lab.dim for lab in labels if lab is not None}
    ranks = {t.dim() for t in pieces}
    if len(dims) != 1 or ranks != {out.dim()} or dim % out.dim() in dims:
        return shape(tr, func, args, kwargs, out)
    d = dims.pop()
    found = [lab for lab in labels if lab is not None]
    if any(lab is None and t.shape[d] > 1 for t, lab in zip(pieces, labels, strict=True)):
        return tr.block_inputs(*pieces)  # a piece of fixed size along the channels
    for lab in found[1:]:
        tr.atoms.unite(found[0].ids, lab.ids)
    tr.set(out, found[0])


def _equal_pieces(tr: TraceState, pieces: list[Tensor]) -> None:
    """``chunk(n)`` / ``split(size)`` cut into equal pieces, and must still do so after
    removal: channel ``i`` of every piece is one channel (a GLU's halves, say)."""
    labels = [tr.label(p) for p in pieces]
    if len(pieces) > 1 and all(lab is not None for lab in labels):
        sizes = {lab.ids.numel() for lab in labels}
        dims = {(lab.dim, p.dim()) for lab, p in zip(labels, pieces, strict=True)}
        if len(sizes) == 1 and len(dims) == 1:
            for lab in labels[1:]:
                tr.atoms.unite(labels[0].ids, lab.ids)


SHAPE_OPS = [
    "view",
    "reshape",
    "permute",
    "transpose",
    "t",
    "T",
    "mT",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "repeat",
    "stack",
    "hstack",
    "vstack",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "narrow",
    "select",
    "__getitem__",
    "index_select",
    "flip",
    "roll",
    "movedim",
    "moveaxis",
    "swapaxes",
    "swapdims",
    "view_as",
    "reshape_as",
    "tile",
    "repeat_interleave",
]


CONCAT_OPS = ["cat", "concat", "concatenate"]


def identity(tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    """Copies and dtype / device conversions keep the labels as they are."""
    tr.set(out, tr.label(args[0]))


IDENTITY_OPS = "contiguous clone detach data to float double half bfloat16 type type_as cpu cuda"
IDENTITY_OPS = IDENTITY_OPS.split()


def block_all(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any
) -> None:
    """Channels read by this operation must all stay (``.item()``, ``.tolist()``...)."""
    tr.block_inputs(*tensors((args, kwargs)))


BLOCKING_OPS = [
    "item",
    "tolist",
    "numpy",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "all",
    "any",
    "equal",
]
METADATA_OPS = [
    "size",
    "dim",
    "shape",
    "dtype",
    "device",
    "numel",
    "is_contiguous",
    "requires_grad",
    "__len__",
    "stride",
    "is_floating_point",
    "element_size",
    "layout",
    "names",
    "ndim",
    "is_cuda",
    "data_ptr",
    "get_device",
    "is_nested",
]
