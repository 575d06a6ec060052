"""Parameter-layer rules: linear, convolutions, norms, embedding, PReLU.

Each couples the input's channels to the parameter's input dimension and labels the
output with the parameter's output atoms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from prunekit.structured.labels import Label
from prunekit.structured.state import TraceState, arg


def consume(tr: TraceState, x: Tensor, dim: int, atoms: Tensor) -> None:
    """``x``'s channels along ``dim`` are read by parameter positions ``atoms``."""
    label = tr.label(x)
    if label is not None and label.dim == dim % x.dim():
        tr.atoms.unite(label.ids, atoms)
        return
    tr.atoms.block(atoms)
    if label is not None:
        tr.atoms.block(label.ids)


def consume_param(tr: TraceState, x: Tensor, dim: int, p: Tensor, p_dim: int) -> None:
    """``x``'s channels along ``dim`` are read by dimension ``p_dim`` of parameter ``p``
    (which takes their atoms: :meth:`~prunekit.structured.state.TraceState.couple`)."""
    label = tr.label(x)
    if label is not None and label.dim == dim % x.dim():
        return tr.couple(p, p_dim, label.ids)
    consume(tr, x, dim, tr.param_atoms(p, p_dim))


def _bias(tr: TraceState, bias: Any, out_atoms: Tensor) -> None:
    """The bias goes with the output channels: a parameter, or a computed bias carrying
    channels (Swin V2's ``qkv.bias.clone()`` with its key third zeroed). A computed bias
    of fixed size keeps every output channel."""
    if tr.is_param(bias):
        tr.couple(bias, 0, out_atoms)
    elif isinstance(bias, Tensor) and bias.numel() > 1:
        label = tr.label(bias)
        if label is not None and label.dim == bias.dim() - 1:
            tr.atoms.unite(label.ids, out_atoms)
        else:
            tr.block_inputs(bias)
            tr.atoms.block(out_atoms)


def linear(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor
) -> None:
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if not tr.is_param(w):  # a computed weight: keep everything it touches
        return tr.block_inputs(x, w, b)
    consume_param(tr, x, -1, w, 1)
    _bias(tr, b, tr.param_atoms(w, 0))
    tr.set(out, Label(out.dim() - 1, tr.param_atoms(w, 0)))


def conv(tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor) -> None:
    """Convolutions, including grouped and depthwise ones.

    ``groups == 1``: input channel ``i`` is read by ``W[:, i]``. Depthwise (``groups ==
    in_channels``): output ``o`` reads input ``o // multiplier`` alone, so they are one
    channel. Other grouped convs: the ``j``-th input (output) channel of every group is
    one channel, so removal keeps the groups equal.
    """
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    groups = arg(args, kwargs, 6, "groups", 1)
    if not tr.is_param(w):
        return tr.block_inputs(x, w, b)
    out_atoms = tr.param_atoms(w, 0)
    _bias(tr, b, out_atoms)
    channels = x.shape[1]
    if groups == 1:
        consume_param(tr, x, 1, w, 1)
    elif groups == channels:
        per_group = w.shape[0] // groups
        consume(tr, x, 1, out_atoms[::per_group])
        for k in range(1, per_group):
            tr.atoms.unite(out_atoms[::per_group], out_atoms[k::per_group])
    else:
        in_atoms = tr.param_atoms(w, 1)
        consume(tr, x, 1, in_atoms.repeat(groups))
        tr.atoms.unite(out_atoms, out_atoms.view(groups, -1)[0].repeat(groups))
    tr.set(out, Label(1, out_atoms))


def conv_transpose(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor
) -> None:
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    groups = arg(args, kwargs, 6, "groups", 1)
    if not tr.is_param(w) or groups != 1:
        return tr.block_inputs(x)
    consume_param(tr, x, 1, w, 0)
    _bias(tr, b, tr.param_atoms(w, 1))
    tr.set(out, Label(1, tr.param_atoms(w, 1)))


def batch_norm(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor
) -> None:
    """BatchNorm / InstanceNorm: per-channel statistics and affine, all members of the channel."""
    x = args[0]
    names = ("running_mean", "running_var", "weight", "bias")
    tensors = [arg(args, kwargs, i, n) for i, n in enumerate(names, start=1)]
    label = tr.label(x)
    owned = [t for t in tensors if tr.is_param(t)]
    if label is None or label.dim != 1:
        for t in owned:
            tr.atoms.block(tr.param_atoms(t, 0))
        tr.block_inputs(x)
        return
    for t in owned:  # each takes the input's atoms
        tr.couple(t, 0, label.ids)
    tr.set(out, label)


def normalize_last(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor
) -> None:
    """LayerNorm / RMSNorm normalise over the last dims: channels there must all stay,
    except in approximate mode (:func:`~prunekit.structured.state.approximate_norms`),
    where channels along the one normalised dimension pass, with the norm's affine."""
    x, normalized = args[0], arg(args, kwargs, 1, "normalized_shape")
    label = tr.label(x)
    if label is None:
        return
    if label.dim < x.dim() - len(normalized):
        return tr.set(out, label)
    if not (tr.approximate and len(normalized) == 1):
        return tr.atoms.block(label.ids)
    for i, name in ((2, "weight"), (3, "bias")) if "layer" in func.__name__ else ((2, "weight"),):
        affine = arg(args, kwargs, i, name)
        if tr.is_param(affine):
            tr.couple(affine, 0, label.ids)
    tr.norms += 1
    tr.set(out, label)


def group_norm(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor
) -> None:
    """GroupNorm mixes the channels of each group: they must all stay."""
    label = tr.label(args[0])
    if label is not None and label.dim == 1:
        tr.atoms.block(label.ids)
    elif label is not None:
        tr.set(out, label)


def embedding(
    tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor
) -> None:
    w = arg(args, kwargs, 1, "weight")
    tr.block_inputs(args[0])
    if tr.is_param(w):
        tr.set(out, Label(out.dim() - 1, tr.param_atoms(w, 1)))


def prelu(tr: TraceState, func: Callable[..., Any], args: tuple, kwargs: dict, out: Tensor) -> None:
    x, w = args[0], arg(args, kwargs, 1, "weight")
    label = tr.label(x)
    if tr.is_param(w) and w.numel() > 1:
        consume_param(tr, x, 1, w, 0)
    if label is not None and (label.dim == 1 or w.numel() == 1):
        tr.set(out, label)
