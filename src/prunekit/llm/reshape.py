"""Physically narrowing a causal LM to uniform widths, in place, with a config that plain
``from_pretrained`` loads.

:func:`slice_widths` keeps, per block, the given query heads, KV heads and MLP neurons and,
in every block and outside them, the given embedding channels: each tensor listed by
:mod:`prunekit.llm.anatomy` is cut with ``index_select`` (a tensor cut along two axes, such
as ``q_proj``'s heads and hidden channels, is cut along both; tied weights stay one
tensor), the module attributes that record sizes follow (``in_features``, ``nf``,
``normalized_shape``, ``num_key_value_groups``, GPT-2's ``split_size``...), and the config
gets the new ``num_attention_heads``, ``num_key_value_heads``, an explicit ``head_dim``,
``intermediate_size`` and ``hidden_size``.

Gemma scales its input embedding by ``sqrt(hidden_size)``, which a reloaded checkpoint
recomputes from the new size: the embedding weight is multiplied by
``sqrt(H / H')`` so the residual stream keeps its scale, and when the LM head is tied to
it, the final norm's ``(1 + w)`` gain is divided by the same factor so the logits do not
change either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunekit.llm.anatomy import Anatomy, Slice, Widths, all_slices


@dataclass(frozen=True)
class Keep:
    """Indices kept, sorted: per block ``heads`` (query heads, grouped by KV head),
    ``kv_heads`` and ``neurons``; ``hidden`` for the whole model."""

    heads: list[Tensor]
    kv_heads: list[Tensor]
    neurons: list[Tensor]
    hidden: Tensor

    def widths(self) -> Widths:
        return Widths(
            len(self.heads[0]), len(self.kv_heads[0]), len(self.neurons[0]), len(self.hidden)
        )


def _kept(axis: str, index: int | None, keep: Keep) -> Tensor:
    if axis == "hidden":
        return keep.hidden
    return {"q": keep.heads, "kv": keep.kv_heads, "neuron": keep.neurons}[axis][index]


def _positions(sl: Slice, kept: Tensor) -> Tensor:
    """Positions along ``sl.dim`` that ``sl`` removes."""
    gone = torch.ones(sl.count, dtype=torch.bool)
    gone[kept.cpu()] = False
    units = gone.nonzero().flatten()
    return (sl.offset + units[:, None] * sl.unit + torch.arange(sl.unit)).flatten()


def _cuts(anatomy: Anatomy, keep: Keep) -> dict[int, tuple[Tensor, dict[int, Tensor]]]:
    """``{id(tensor): (tensor, {dim: boolean keep mask})}``."""
    cuts: dict[int, tuple[Tensor, dict[int, Tensor]]] = {}
    block_of = {
        id(sl): i for i, b in enumerate(anatomy.layers) for s in b.slices.values() for sl in s
    }
    for axis, sl in all_slices(anatomy):
        tensor = sl.tensor
        _, masks = cuts.setdefault(id(tensor), (tensor, {}))
        mask = masks.setdefault(sl.dim, torch.ones(tensor.shape[sl.dim], dtype=torch.bool))
        mask[_positions(sl, _kept(axis, block_of.get(id(sl)), keep))] = False
    return cuts


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append((module, name))
    return holders


def _cut_tensors(anatomy: Anatomy, keep: Keep) -> None:
    holders = _holders(anatomy.model)
    for key, (tensor, masks) in _cuts(anatomy, keep).items():
        data = tensor.detach()
        for dim, mask in masks.items():
            data = data.index_select(dim, mask.nonzero().flatten().to(data.device))
        new = nn.Parameter(data.clone(), requires_grad=tensor.requires_grad)
        for module, name in holders[key]:
            setattr(module, name, new)


def _sync_attributes(anatomy: Anatomy) -> None:
    for module in anatomy.model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            continue
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = weight.shape[1]
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(weight.shape)
        elif hasattr(module, "nf"):  # transformers Conv1D, stored (in, out)
            module.nf = weight.shape[1]


def _sync_attention(anatomy: Anatomy, widths: Widths) -> None:
    for block in anatomy.layers:
        attn = _attention_of(block.module)
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = widths.heads // widths.kv_heads
        if hasattr(attn, "split_size"):  # GPT-2: q, k and v are each heads * head_dim wide
            attn.split_size = attn.embed_dim = widths.heads * anatomy.head_dim
            attn.num_heads = widths.heads


def _attention_of(block: nn.Module) -> nn.Module:
    return block.self_attn if hasattr(block, "self_attn") else block.attn


def _update_config(anatomy: Anatomy, widths: Widths) -> None:
    config = anatomy.model.config
    config.num_attention_heads = widths.heads
    config.hidden_size = widths.hidden
    if anatomy.model_type == "gpt2":
        config.n_inner = widths.intermediate
        return
    config.num_key_value_heads = widths.kv_heads
    config.head_dim = anatomy.head_dim
    config.intermediate_size = widths.intermediate


def _rescale_gemma_embedding(anatomy: Anatomy, hidden: int) -> None:
    embedding = anatomy.embedding
    if not isinstance(getattr(embedding, "embed_scale", None), Tensor):
        return
    old, new = float(embedding.embed_scale), hidden**0.5
    factor = old / new
    with torch.no_grad():
        embedding.embed_scale.fill_(new)
        if hasattr(embedding, "scalar_embed_scale"):
            embedding.scalar_embed_scale = new
        embedding.weight.mul_(factor)
        if anatomy.model.lm_head.weight is embedding.weight:
            norm = anatomy.outer_norms[0]
            norm.weight.copy_((1 + norm.weight.float()) / factor - 1)


def slice_widths(anatomy: Anatomy, keep: Keep) -> Widths:
    """Cut the model of ``anatomy`` to ``keep`` in place (module docstring); returns the
    new widths. ``keep`` must be valid (:func:`prunekit.llm.shrink.plan` checks it)."""
    widths = keep.widths()
    _cut_tensors(anatomy, keep)
    _sync_attributes(anatomy)
    _sync_attention(anatomy, widths)
    _update_config(anatomy, widths)
    if widths.hidden != anatomy.widths.hidden:
        _rescale_gemma_embedding(anatomy, widths.hidden)
    return widths
