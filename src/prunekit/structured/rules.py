"""The built-in channel rules: how each torch operation moves and couples channels.

Families (each rule reads input labels and labels the output, see ``Tracer``):

- **shape** (view, permute, cat, split, slicing, ...): the same operation applied to the
  per-element labels gives the output's labels, whatever the operation does;
- **elementwise** (add, mul, activations, ...): operands are aligned by broadcasting and
  united position by position; an unlabelled operand that does not broadcast along the
  channel dimension fixes those channels (``x + f(x)`` with ``x`` an input);
- **reductions** over the channel dimension (mean, softmax, norms) mix channels, so they
  block them; over other dimensions channels pass through;
- **parameter layers** (linear, conv, norms, embedding, attention) couple the input's
  channels to the parameter's input dimension and label the output with the parameter's
  output atoms;
- **matmul** between activations unites contracted and batch dimensions (attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from prunekit.structured.labels import Label
from prunekit.structured.trace import (
    HeadEvent,
    Tracer,
    _tensors,
    func_name,
    keep_whole,
    register_module_rule,
    register_rule,
)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


# -- shape ----------------------------------------------------------------------------
def shape(tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
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


def _equal_pieces(tr: Tracer, pieces: list[Tensor]) -> None:
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
    "cat",
    "concat",
    "concatenate",
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


def identity(tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    """Copies and dtype / device conversions keep the labels as they are."""
    tr.set(out, tr.label(args[0]))


IDENTITY_OPS = "contiguous clone detach data to float double half bfloat16 type type_as cpu cuda"
IDENTITY_OPS = IDENTITY_OPS.split()


# -- elementwise ----------------------------------------------------------------------
def elementwise(tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    """Broadcasting operation: channels at the same position are the same channel."""
    outs = _tensors(out)
    if not outs:
        return
    ndim = outs[0].dim()
    result: Label | None = None
    unlabelled: list[Tensor] = []
    for t in _tensors((args, kwargs)):
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
]


# -- reductions and pooling -------------------------------------------------------------
def _dims(value: Any, ndim: int) -> list[int] | None:
    if value is None:
        return None
    dims = [value] if isinstance(value, int) else list(value)
    return [d % ndim for d in dims]


def reduction(tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    """``sum``, ``mean``, ``softmax``...: mixing along the channels blocks them."""
    x = args[0]
    dim = _arg(args, kwargs, *_DIM_ARG.get(func_name(func), (1, "dim")))
    if isinstance(dim, Tensor):  # torch.max(a, b): elementwise
        return elementwise(tr, func, args, kwargs, out)
    label = tr.label(x)
    if label is None:
        return
    dims = _dims(dim, x.dim())
    if dims is None or label.dim in dims:
        tr.atoms.block(label.ids)
        return
    for o in tree_flatten(out)[0]:
        if isinstance(o, Tensor) and o.dim() > 0:
            shift = 0 if o.dim() == x.dim() else sum(d < label.dim for d in dims)
            tr.set(o, Label(label.dim - shift, label.ids))


_DIM_ARG = {"norm": (2, "dim"), "normalize": (2, "dim", 1)}
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


def per_channel(tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    """Pooling, padding, resizing: spatial work per channel, channels on dim 0 or 1 pass."""
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
    "pad",
    "lp_pool2d",
]


def block_all(tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    """Channels read by this operation must all stay (``.item()``, ``.tolist()``...)."""
    tr.block_inputs(*_tensors((args, kwargs)))


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
]


# -- parameter layers -------------------------------------------------------------------
def _consume(tr: Tracer, x: Tensor, dim: int, atoms: Tensor) -> None:
    """``x``'s channels along ``dim`` are read by parameter positions ``atoms``."""
    label = tr.label(x)
    if label is not None and label.dim == dim % x.dim():
        tr.atoms.unite(label.ids, atoms)
        return
    tr.atoms.block(atoms)
    if label is not None:
        tr.atoms.block(label.ids)


def _bias(tr: Tracer, bias: Any, out_atoms: Tensor) -> None:
    if tr.is_param(bias):
        tr.atoms.unite(tr.param_atoms(bias, 0), out_atoms)


def linear(tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor) -> None:
    x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if not tr.is_param(w):  # a computed weight: keep everything it touches
        return tr.block_inputs(x, w, b)
    _consume(tr, x, -1, tr.param_atoms(w, 1))
    _bias(tr, b, tr.param_atoms(w, 0))
    tr.set(out, Label(out.dim() - 1, tr.param_atoms(w, 0)))


def conv(tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor) -> None:
    """Convolutions, including grouped and depthwise ones.

    ``groups == 1``: input channel ``i`` is read by ``W[:, i]``. Depthwise (``groups ==
    in_channels``): output ``o`` reads input ``o // multiplier`` alone, so they are one
    channel. Other grouped convs: the ``j``-th input (output) channel of every group is
    one channel, so removal keeps the groups equal.
    """
    x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    groups = _arg(args, kwargs, 6, "groups", 1)
    if not tr.is_param(w):
        return tr.block_inputs(x, w, b)
    out_atoms = tr.param_atoms(w, 0)
    _bias(tr, b, out_atoms)
    channels = x.shape[1]
    if groups == 1:
        _consume(tr, x, 1, tr.param_atoms(w, 1))
    elif groups == channels:
        per_group = w.shape[0] // groups
        _consume(tr, x, 1, out_atoms[::per_group])
        for k in range(1, per_group):
            tr.atoms.unite(out_atoms[::per_group], out_atoms[k::per_group])
    else:
        in_atoms = tr.param_atoms(w, 1)
        _consume(tr, x, 1, in_atoms.repeat(groups))
        tr.atoms.unite(out_atoms, out_atoms.view(groups, -1)[0].repeat(groups))
    tr.set(out, Label(1, out_atoms))


def conv_transpose(
    tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor
) -> None:
    x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    groups = _arg(args, kwargs, 6, "groups", 1)
    if not tr.is_param(w) or groups != 1:
        return tr.block_inputs(x)
    _consume(tr, x, 1, tr.param_atoms(w, 0))
    _bias(tr, b, tr.param_atoms(w, 1))
    tr.set(out, Label(1, tr.param_atoms(w, 1)))


def batch_norm(
    tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor
) -> None:
    """BatchNorm / InstanceNorm: per-channel statistics and affine, all members of the channel."""
    x = args[0]
    names = ("running_mean", "running_var", "weight", "bias")
    tensors = [_arg(args, kwargs, i, n) for i, n in enumerate(names, start=1)]
    label = tr.label(x)
    owned = [t for t in tensors if tr.is_param(t)]
    if label is None or label.dim != 1:
        for t in owned:
            tr.atoms.block(tr.param_atoms(t, 0))
        tr.block_inputs(x)
        return
    for t in owned:
        tr.atoms.unite(label.ids, tr.param_atoms(t, 0))
    tr.set(out, label)


def normalize_last(
    tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor
) -> None:
    """LayerNorm / RMSNorm normalise over the last dims: channels there must all stay."""
    x, normalized = args[0], _arg(args, kwargs, 1, "normalized_shape")
    label = tr.label(x)
    if label is None:
        return
    if label.dim >= x.dim() - len(normalized):
        tr.atoms.block(label.ids)
    else:
        tr.set(out, label)


def group_norm(
    tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor
) -> None:
    """GroupNorm mixes the channels of each group: they must all stay."""
    label = tr.label(args[0])
    if label is not None and label.dim == 1:
        tr.atoms.block(label.ids)
    elif label is not None:
        tr.set(out, label)


def embedding(tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor) -> None:
    w = _arg(args, kwargs, 1, "weight")
    tr.block_inputs(args[0])
    if tr.is_param(w):
        tr.set(out, Label(out.dim() - 1, tr.param_atoms(w, 1)))


def prelu(tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    label = tr.label(x)
    if tr.is_param(w) and w.numel() > 1:
        _consume(tr, x, 1, tr.param_atoms(w, 0))
    if label is not None and (label.dim == 1 or w.numel() == 1):
        tr.set(out, label)


# -- attention and matmul -----------------------------------------------------------------
def attention(tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor) -> None:
    """``scaled_dot_product_attention``: a head of the queries, the keys and the values is
    one channel (with grouped-query attention, ``heads // kv_heads`` query heads share a
    key/value head)."""
    q, k, v = args[0], args[1], args[2]
    mask = _arg(args, kwargs, 3, "attn_mask")
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


def matmul_like(tr: Tracer, a: Tensor, b: Tensor, out: Tensor) -> None:
    """``a @ b`` on activations (or a parameter in either place).

    The contracted dimension couples ``a``'s columns with ``b``'s rows; batch dimensions
    couple position by position (an attention head of the scores with the same head of
    the values); the output carries ``a``'s row channels or ``b``'s column channels.
    """
    if tr.is_param(b) and b.dim() == 2:
        _consume(tr, a, -1, tr.param_atoms(b, 0))
        return tr.set(out, Label(out.dim() - 1, tr.param_atoms(b, 1)))
    if tr.is_param(a) and a.dim() == 2:
        _consume(tr, b, -2, tr.param_atoms(a, 1))
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


def matmul(tr: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor) -> None:
    if func_name(func) in ("addmm", "baddbmm"):
        bias, a, b = args[0], args[1], args[2]
        matmul_like(tr, a, b, out)
        label = tr.label(out)
        if tr.is_param(bias) and label is not None and label.dim == out.dim() - 1:
            tr.atoms.unite(tr.param_atoms(bias, -1), label.ids)
        elif isinstance(bias, Tensor):
            tr.block_inputs(bias)
        return
    matmul_like(tr, args[0], args[1], out)


def _register_builtins() -> None:
    for names, rule in (
        (SHAPE_OPS, shape),
        (IDENTITY_OPS, identity),
        (ELEMENTWISE_OPS, elementwise),
        (REDUCTION_OPS, reduction),
        (POOL_OPS, per_channel),
        (BLOCKING_OPS, block_all),
        (METADATA_OPS, lambda *_: None),
    ):
        for name in names:
            register_rule(name, rule)
    for name, rule in (
        ("linear", linear),
        ("conv1d", conv),
        ("conv2d", conv),
        ("conv3d", conv),
        ("conv_transpose1d", conv_transpose),
        ("conv_transpose2d", conv_transpose),
        ("batch_norm", batch_norm),
        ("instance_norm", batch_norm),
        ("layer_norm", normalize_last),
        ("rms_norm", normalize_last),
        ("group_norm", group_norm),
        ("embedding", embedding),
        ("prelu", prelu),
        ("scaled_dot_product_attention", attention),
        ("matmul", matmul),
        ("__matmul__", matmul),
        ("mm", matmul),
        ("bmm", matmul),
        ("addmm", matmul),
        ("baddbmm", matmul),
    ):
        register_rule(name, rule)
    for module_type in (nn.RNNBase, nn.MultiheadAttention):
        register_module_rule(module_type, keep_whole)


_register_builtins()
