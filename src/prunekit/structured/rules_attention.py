"""Attention and matmul rules.

``scaled_dot_product_attention`` makes a head of the queries, keys and values one
channel; a matmul between activations unites the contracted dimension and couples batch
dimensions position by position (an attention head of the scores with the same head of
the values).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from prunekit.structured.labels import Label
from prunekit.structured.registry import func_name
from prunekit.structured.rules_layers import consume_param
from prunekit.structured.state import HeadEvent, TraceState, arg


def attention(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor
) -> None:
    """``scaled_dot_product_attention``: a head of the queries, the keys and the values is
    one channel (with grouped-query attention, ``heads // kv_heads`` query heads share a
    key/value head)."""
    q, k, v = args[0], args[1], args[2]
    mask = arg(args, kwargs, 3, "attn_mask")
    labels = [tr.label(t) for t in (q, k, v)]
    head_dim = q.dim() - 3
    if any(lab is None or lab.dim != head_dim for lab in labels):
        tr.block_inputs(q, k, v)
        return
    lq, lk, lv = labels
    rep = q.shape[head_dim] // k.shape[head_dim]
    kv = lk.ids.repeat_interleave(rep)
    tr.atoms.unite(lq.ids, kv)
    tr.atoms.unite(lk.ids, lv.ids)
    if isinstance(mask, Tensor):
        tr.block_inputs(mask)
        if mask.dim() > head_dim and mask.shape[head_dim - 4 + mask.dim()] > 1:
            tr.atoms.block(lq.ids)
    tr.heads.append(HeadEvent(tr.where, lq.ids, lk.ids))
    tr.set(out, Label(head_dim, lq.ids))


def matmul_like(tr: TraceState, a: Tensor, b: Tensor, out: Tensor) -> None:
    """``a @ b`` on activations (or a parameter in either place).

    The contracted dimension couples ``a``'s columns with ``b``'s rows; batch dimensions
    couple position by position (an attention head of the scores with the same head of
    the values); the output carries ``a``'s row channels or ``b``'s column channels.
    """
    if tr.is_param(b) and b.dim() == 2:
        consume_param(tr, a, -1, b, 0)
        return tr.set(out, Label(out.dim() - 1, tr.param_atoms(b, 1)))
    if tr.is_param(a) and a.dim() == 2:
        consume_param(tr, b, -2, a, 1)
        return tr.set(out, Label(out.dim() - 2, tr.param_atoms(a, 0)))
    la, lb = tr.label(a), tr.label(b)
    if a.dim() < 2 or b.dim() < 2:
        return tr.block_inputs(a, b)
    nd = out.dim()
    pa = None if la is None else la.dim + nd - a.dim()  # in output coordinates
    pb = None if lb is None else lb.dim + nd - b.dim()
    if la is not None and lb is not None and (pa, pb) == (nd - 1, nd - 2):
        return tr.atoms.unite(la.ids, lb.ids)  # contracted together: the sum loses both
    if la is not None and lb is not None and pa == pb and pa < nd - 2:
        tr.atoms.unite(la.ids, lb.ids)  # the same batch index (head) of both operands
        tr.heads.append(HeadEvent(tr.where, la.ids, lb.ids))
        return tr.set(out, Label(pa, la.ids))
    result: Label | None = None
    for label, pos, other, own in ((la, pa, b, nd - 2), (lb, pb, a, nd - 1)):
        if label is None:
            continue
        at = pos - (nd - other.dim())
        batch_ok = pos < nd - 2 and (at < 0 or other.shape[at] == 1)
        if result is None and (pos == own or batch_ok):
            result = Label(pos, label.ids)
        else:
            tr.atoms.block(label.ids)
    tr.set(out, result)


def matmul(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor
) -> None:
    if func_name(func) in ("addmm", "baddbmm"):
        bias, a, b = args[0], args[1], args[2]
        matmul_like(tr, a, b, out)
        label = tr.label(out)
        if tr.is_param(bias) and label is not None and label.dim == out.dim() - 1:
            tr.couple(bias, -1, label.ids)
        elif isinstance(bias, Tensor):
            tr.block_inputs(bias)
        return
    matmul_like(tr, args[0], args[1], out)
