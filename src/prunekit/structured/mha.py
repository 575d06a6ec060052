"""Head pruning inside ``nn.MultiheadAttention``.

The module packs the query, key and value projections into one ``in_proj_weight`` of
``(3 E, E)`` rows ``[q; k; v]``, each ``H`` heads of ``E / H`` rows, and ``out_proj``
reads the heads back from its ``E`` input columns. Head ``h`` is therefore one group:
rows ``h``, ``E + h`` and ``2 E + h`` (head-sized) of ``in_proj_weight`` and
``in_proj_bias``, and columns ``h`` of ``out_proj.weight``. The model width ``E`` (the
projections' inputs and ``out_proj``'s outputs) stays.

PyTorch's own forward requires the inner width to equal ``E``, so a module that lost
heads becomes a :class:`HeadPrunedMultiheadAttention`: the same parameters, buffers and
attributes (``num_heads`` the heads kept), with a forward that computes
``out_proj(concat_h softmax(Q_h K_h^T / sqrt(d) + mask) V_h)`` for any number of heads.
Configurations it does not cover (``kdim`` / ``vdim`` other than ``E``, ``bias_k`` /
``bias_v``, ``add_zero_attn``, a per-head 3-D ``attn_mask``) are kept whole.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.structured.state import HeadEvent, TraceState, tensors


def _supported(module: nn.MultiheadAttention, args: tuple) -> bool:
    mask = args[5] if len(args) > 5 else None
    return (module._qkv_same_embed_dim or isinstance(module, HeadPrunedMultiheadAttention)) and (
        module.bias_k is None
        and not module.add_zero_attn
        and (not isinstance(mask, Tensor) or mask.dim() == 2)
    )


def multihead_attention(
    tr: TraceState, module: nn.MultiheadAttention, args: tuple, out: Any
) -> None:
    """Module rule: each head is one group (see the module docstring); the width stays."""
    tr.block_inputs(*tensors(args))
    if not _supported(module, args):
        return
    heads, weight = module.num_heads, module.in_proj_weight
    rows = tr.param_atoms(weight, 0).view(3, heads, -1)
    tr.atoms.block(tr.param_atoms(weight, 1))
    out_w, out_b = module.out_proj.weight, module.out_proj.bias
    tr.atoms.block(tr.param_atoms(out_w, 0))
    if out_b is not None:
        tr.atoms.block(tr.param_atoms(out_b, 0))
    parts = [rows.transpose(0, 1).reshape(heads, -1), tr.param_atoms(out_w, 1).view(heads, -1)]
    if module.in_proj_bias is not None:
        bias = tr.param_atoms(module.in_proj_bias, 0).view(3, heads, -1)
        parts.append(bias.transpose(0, 1).reshape(heads, -1))
    for h in range(heads):
        tr.atoms.unite_all(torch.cat([p[h] for p in parts]))
    first = rows[0, :, 0].clone()
    tr.heads.append(HeadEvent(tr.where, first, first))


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose heads were pruned: inner width ``num_heads *
    head_dim`` below ``embed_dim`` (see the module docstring). Same arguments and results
    as the parent's forward."""

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value)  # (N, H, L or S, d)
        mask = self._mask(key_padding_mask, attn_mask, is_causal, q)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        attn = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        attn = F.dropout(attn, self.dropout, self.training)
        out = (attn @ v).permute(2, 0, 1, 3).flatten(2)  # (L, N, inner)
        out = self.out_proj(out)
        out = out.squeeze(1) if not batched else out.transpose(0, 1) if self.batch_first else out
        weights = attn.mean(1) if average_attn_weights else attn
        return out, (weights if batched else weights[0]) if need_weights else None

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        bias = self.in_proj_bias
        w = self.in_proj_weight.chunk(3)
        b = bias.chunk(3) if bias is not None else (None, None, None)
        n = query.shape[1]
        return tuple(
            F.linear(x, wi, bi).reshape(x.shape[0], n, self.num_heads, -1).permute(1, 2, 0, 3)
            for x, wi, bi in zip((query, key, value), w, b, strict=True)
        )

    def _mask(
        self, padding: Tensor | None, attn_mask: Tensor | None, is_causal: bool, q: Tensor
    ) -> Tensor | None:
        """One additive mask broadcasting to ``(N, H, L, S)`` (boolean True = masked)."""
        total: Tensor | None = None
        if attn_mask is None and is_causal:
            size = q.shape[-2]
            attn_mask = torch.ones(size, size, dtype=torch.bool, device=q.device).triu(1)
        for m, expand in ((attn_mask, (None, None)), (padding, (slice(None), None, None))):
            if m is None:
                continue
            if m.dtype == torch.bool:
                m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, -math.inf)
            m = m.to(q.dtype)[expand]  # (1, 1, L, S) or (N, 1, 1, S)
            total = m if total is None else total + m
        return total


def unpack(module: nn.MultiheadAttention) -> None:
    """After removal: a module whose inner width fell below ``embed_dim`` becomes a
    :class:`HeadPrunedMultiheadAttention` (PyTorch's fused paths then stay off)."""
    if module.in_proj_weight is not None and module.in_proj_weight.shape[0] < 3 * module.embed_dim:
        module.__class__ = HeadPrunedMultiheadAttention
        module._qkv_same_embed_dim = False  # keeps TransformerEncoderLayer's fast path off
