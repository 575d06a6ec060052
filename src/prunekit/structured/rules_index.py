"""Rules for einsum, sorting and gathering, padding and in-place fills.

- ``einsum``: every subscript letter is one axis shared by the operands that name it.
  Channel atoms along the same letter are united (contracted or not); a letter that some
  operand carries with a fixed size (an unlabelled activation) blocks the channels along
  it; parameters give every dimension its own atoms, so a weight used through einsum
  shrinks like a linear layer's. The output carries the first labelled letter it keeps.
- ``topk`` / ``sort`` / ``argsort`` / ``kthvalue`` along a dimension that is not the
  channels' reorder positions within each channel: values and indices keep the label.
  Along the channels they mix them, which blocks them.
- ``gather`` / ``take_along_dim`` along another dimension read each channel's own
  entries: the output keeps the channels (united with an index that carries them).
- ``pad`` pads the last dimensions: channels pass unless their dimension is padded.
- In-place fills (``zero_``, ``fill_``, ``normal_``...) keep the tensor's labels.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

from torch import Tensor

from prunekit.structured.labels import Label
from prunekit.structured.state import TraceState, arg, tensors


def _letters(equation: str, operands: list[Tensor]) -> tuple[list[str], str]:
    """The subscripts of each operand and of the output, ``...`` spelt out in capitals."""
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    width = max((t.dim() - len(s.replace("...", "")) for s, t in zip(terms, operands, strict=True)
                 if "..." in s), default=0)  # fmt: skip
    batch = string.ascii_uppercase[:width]
    spelt = []
    for s, t in zip(terms, operands, strict=True):
        n = t.dim() - len(s.replace("...", ""))
        spelt.append(s.replace("...", batch[width - n :] if n else ""))
    if "->" not in equation:
        once = sorted(c for c in "".join(spelt) if "".join(spelt).count(c) == 1 and c.islower())
        rhs = batch + "".join(once)
    return spelt, rhs.replace("...", batch)


def einsum(tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    """``torch.einsum(equation, *operands)`` (see the module docstring)."""
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], list | tuple) else args[1:]
    if not isinstance(args[0], str) or not isinstance(out, Tensor):
        return tr.block_inputs(*tensors((args, kwargs)))
    terms, rhs = _letters(args[0], list(operands))
    atoms: dict[str, list[Tensor]] = {}
    fixed: set[str] = set()
    for term, t in zip(terms, operands, strict=True):
        label = None if tr.is_param(t) else tr.label(t)
        for d, c in enumerate(term):
            if tr.is_param(t) and t.shape[d] > 1:
                atoms.setdefault(c, []).append(tr.param_atoms(t, d))
            elif label is not None and label.dim == d:
                atoms.setdefault(c, []).append(label.ids)
            elif t.shape[d] > 1:
                fixed.add(c)
    kept: str | None = None
    for c, found in atoms.items():
        for other in found[1:]:
            tr.atoms.unite(found[0], other)
        summed_alone = c not in rhs and len(found) < 2  # a sum over the channels
        if c in fixed or summed_alone or (c in rhs and kept is not None):
            tr.atoms.block(found[0])
        elif c in rhs:
            kept = c
    if kept is not None:
        tr.set(out, Label(rhs.index(kept), atoms[kept][0]))


def sort_along(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any
) -> None:
    """``topk`` / ``sort`` / ``argsort`` / ``kthvalue``: per-channel off the channels."""
    x = args[0]
    label = tr.label(x)
    if label is None:
        return
    name = getattr(func, "__name__", "")
    position, default = {"topk": (2, -1), "kthvalue": (2, -1)}.get(name, (1, -1))
    dim = arg(args, kwargs, position, "dim", default)
    if dim % x.dim() == label.dim:
        tr.atoms.block(label.ids)
        return
    for o in tensors(out):
        if o.dim() == x.dim():
            tr.set(o, label)
        elif o.dim() == x.dim() - 1:  # kthvalue without keepdim drops ``dim``
            tr.set(o, Label(label.dim - (dim % x.dim() < label.dim), label.ids))


def gather(tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    """``gather(x, dim, index)`` / ``take_along_dim(x, index, dim)`` off the channels."""
    x = args[0]
    take = getattr(func, "__name__", "") == "take_along_dim"
    index = arg(args, kwargs, 1, "indices") if take else arg(args, kwargs, 2, "index")
    dim = arg(args, kwargs, 2, "dim") if take else arg(args, kwargs, 1, "dim")
    lx, li = tr.label(x), tr.label(index)
    ok = (lx is not None and isinstance(out, Tensor) and dim is not None and out.dim() == x.dim()
          and dim % x.dim() != lx.dim and out.shape[lx.dim] == x.shape[lx.dim])  # fmt: skip
    if not ok:
        return tr.block_inputs(x, index)
    if li is not None and li.dim == lx.dim:
        tr.atoms.unite(lx.ids, li.ids)
    elif li is not None or index.shape[lx.dim] > 1:  # an index of fixed size along them
        tr.block_inputs(x, index)
        return
    tr.set(out, lx)


def pad(tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    """``F.pad(x, (left_last, right_last, left_2nd_last, ...))``: channels pass unless
    their dimension is padded."""
    x, widths = args[0], arg(args, kwargs, 1, "pad", ())
    label = tr.label(x)
    if label is None:
        return
    padded = {x.dim() - 1 - i // 2 for i, w in enumerate(widths) if w}
    if label.dim in padded:
        tr.atoms.block(label.ids)
    else:
        tr.set(out, label)


def keep_labels(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any
) -> None:
    """In-place fills (``zero_``, ``fill_(value)``, ``normal_``...): the tensor keeps its
    channels (a fill from a tensor value couples nothing: it is one value for all)."""
    value = arg(args, kwargs, 1, "value")
    if isinstance(value, Tensor) and value.numel() > 1:
        tr.block_inputs(args[0], value)
        return
    tr.set(out, tr.label(args[0]))


SORT_OPS = ["topk", "sort", "argsort", "kthvalue"]
GATHER_OPS = ["gather", "take_along_dim"]
FILL_OPS = ["zero_", "fill_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_"]
