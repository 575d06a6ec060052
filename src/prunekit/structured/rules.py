"""The built-in channel rules: how each torch operation moves and couples channels.

Families (each rule reads input labels and labels the output, see
:class:`~prunekit.structured.state.TraceState`), one module each:

- **shape** (:mod:`~prunekit.structured.rules_shape`: view, permute, cat, split,
  slicing, ...): the same operation applied to the per-element labels gives the output's
  labels, whatever the operation does;
- **elementwise** (:mod:`~prunekit.structured.rules_elementwise`: add, mul, activations,
  ...): operands are aligned by broadcasting and united position by position; an
  unlabelled operand that does not broadcast along the channel dimension fixes those
  channels (``x + f(x)`` with ``x`` an input);
- **reductions** (:mod:`~prunekit.structured.rules_reduction`) over the channel
  dimension (mean, softmax, norms) mix channels, so they block them; over other
  dimensions channels pass through;
- **parameter layers** (:mod:`~prunekit.structured.rules_layers`: linear, conv, norms,
  embedding) couple the input's channels to the parameter's input dimension and label the
  output with the parameter's output atoms;
- **attention and matmul** (:mod:`~prunekit.structured.rules_attention`) between
  activations unite contracted and batch dimensions;
- **einsum, sorting, gathering, padding, in-place fills**
  (:mod:`~prunekit.structured.rules_index`): einsum letters are shared axes; sorting and
  gathering off the channel dimension keep the channels; padding passes channels unless
  it pads their dimension; ``zero_`` / ``fill_`` keep the labels;
- **modules traced whole**: RNNs keep every channel; ``nn.MultiheadAttention`` loses
  whole heads (:mod:`~prunekit.structured.mha`).

Importing this module registers them (:mod:`~prunekit.structured.registry`); the tracer
imports it.
"""

from __future__ import annotations

from torch import nn

from prunekit.structured.mha import multihead_attention
from prunekit.structured.registry import keep_whole, register_module_rule, register_rule
from prunekit.structured.rules_attention import attention, matmul
from prunekit.structured.rules_elementwise import ELEMENTWISE_OPS, elementwise
from prunekit.structured.rules_index import (
    FILL_OPS,
    GATHER_OPS,
    SORT_OPS,
    einsum,
    gather,
    keep_labels,
    pad,
    sort_along,
)
from prunekit.structured.rules_layers import (
    batch_norm,
    conv,
    conv_transpose,
    embedding,
    group_norm,
    linear,
    normalize_last,
    prelu,
)
from prunekit.structured.rules_reduction import POOL_OPS, REDUCTION_OPS, per_channel, reduction
from prunekit.structured.rules_shape import (
    BLOCKING_OPS,
    CONCAT_OPS,
    IDENTITY_OPS,
    METADATA_OPS,
    SHAPE_OPS,
    block_all,
    concat,
    identity,
    shape,
)


def _register_builtins() -> None:
    for names, rule in (
        (SHAPE_OPS, shape),
        (CONCAT_OPS, concat),
        (IDENTITY_OPS, identity),
        (ELEMENTWISE_OPS, elementwise),
        (REDUCTION_OPS, reduction),
        (POOL_OPS, per_channel),
        (BLOCKING_OPS, block_all),
        (METADATA_OPS, lambda *_: None),
        (SORT_OPS, sort_along),
        (GATHER_OPS, gather),
        (FILL_OPS, keep_labels),
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
        ("einsum", einsum),
        ("pad", pad),
        ("scaled_dot_product_attention", attention),
        ("matmul", matmul),
        ("__matmul__", matmul),
        ("mm", matmul),
        ("bmm", matmul),
        ("addmm", matmul),
        ("baddbmm", matmul),
    ):
        register_rule(name, rule)
    register_module_rule(nn.RNNBase, keep_whole)
    register_module_rule(nn.MultiheadAttention, multihead_attention)


_register_builtins()
