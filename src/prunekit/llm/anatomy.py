"""Where the prunable units of a decoder-only transformer live: one description that drives
scoring (weight norms, Taylor), parameter counting and the physical shrink.

A unit of an **axis** is a contiguous run of ``unit`` indices along one dimension of one
or more tensors (a :class:`Slice`):

==========  ==========================================  ==============================
axis        one unit                                     tensors (Llama naming)
==========  ==========================================  ==============================
``q``       one query head (``head_dim`` rows/columns)   q_proj rows (+bias), o_proj columns
``kv``      one key/value head (a GQA group)             k_proj, v_proj rows (+biases)
``neuron``  one MLP intermediate channel                 gate/up rows (+biases), down columns
``hidden``  one embedding channel (residual stream)      embeddings, every norm, every
                                                         block input column / output row,
                                                         the LM head
==========  ==========================================  ==============================

GPT-2 packs q, k and v in one ``Conv1D`` (``c_attn``, stored ``(in, out)``): the three
segments of its output axis are three slices with offsets ``0, H, 2H``. Tied weights (the
LM head and the input embedding) are one tensor, listed once.

Supported: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), GPT-2; any other
architecture is an :class:`~prunekit.errors.IncompatibleLayerError` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import Tensor, nn

from prunekit.errors import IncompatibleLayerError
from prunekit.layers import require_model

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
SUPPORTED = (*LLAMA_LIKE, "gpt2")
AXES = ("q", "kv", "neuron", "hidden")


@dataclass(frozen=True)
class Slice:
    """``count`` units of ``unit`` indices each, from ``offset``, along ``dim`` of
    ``owner.<name>`` (a parameter or buffer)."""

    owner: nn.Module
    name: str
    dim: int
    unit: int
    count: int
    offset: int = 0

    @property
    def tensor(self) -> Tensor:
        return getattr(self.owner, self.name)

    def view(self, tensor: Tensor | None = None) -> Tensor:
        """The covered part of the tensor (or of ``tensor``, shaped like it, e.g. its
        gradient) as ``(count, unit, *rest)``: units first."""
        source = self.tensor if tensor is None else tensor
        part = source.detach().narrow(self.dim, self.offset, self.count * self.unit)
        part = part.movedim(self.dim, 0)
        return part.reshape(self.count, self.unit, *part.shape[1:])


@dataclass(frozen=True)
class Widths:
    """The uniform width of every block: query heads, KV heads, MLP and hidden size."""

    heads: int
    kv_heads: int
    intermediate: int
    hidden: int


@dataclass
class Block:
    """One decoder block: its slices per axis and the modules scoring hooks read."""

    module: nn.Module
    slices: dict[str, list[Slice]]
    head_input: nn.Module  # o_proj / c_proj: its input holds the concatenated head outputs
    neuron_input: nn.Module  # down_proj / mlp.c_proj: its input holds the MLP activations
    input_norms: list[nn.Module]  # the norms whose output feeds the attention and the MLP
    norms: list[nn.Module]


@dataclass
class Anatomy:
    """A supported causal LM, described axis by axis (module docstring)."""

    model: nn.Module
    model_type: str
    blocks_path: str
    blocks: nn.ModuleList
    widths: Widths
    head_dim: int
    layers: list[Block]
    outer_hidden: list[Slice] = field(default_factory=list)  # embeddings, final norm, head
    outer_norms: list[nn.Module] = field(default_factory=list)
    embedding: nn.Module | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.widths.heads // self.widths.kv_heads

    def hidden_slices(self) -> Iterator[Slice]:
        """Every slice of the hidden axis, once per tensor (tied weights listed once)."""
        seen: set[int] = set()
        for sl in [*self.outer_hidden, *(s for b in self.layers for s in b.slices["hidden"])]:
            key = id(sl.tensor)
            if key not in seen:
                seen.add(key)
                yield sl


def _linear(module: nn.Module, dim_out: int, unit: int, count: int, offset: int = 0) -> list[Slice]:
    """Slices over a Linear's output axis (weight rows and bias)."""
    out = [Slice(module, "weight", dim_out, unit, count, offset)]
    if getattr(module, "bias", None) is not None:
        out.append(Slice(module, "bias", 0, unit, count, offset))
    return out


def _norm(module: nn.Module, hidden: int) -> list[Slice]:
    return [
        Slice(module, name, 0, 1, hidden)
        for name in ("weight", "bias")
        if isinstance(getattr(module, name, None), Tensor)
    ]


def _llama_block(block: nn.Module, w: Widths, head_dim: int) -> Block:
    attn, mlp, h = block.self_attn, block.mlp, w.hidden
    norms = [m for n, m in block.named_children() if n.endswith("layernorm")]
    second = (
        "pre_feedforward_layernorm"
        if hasattr(block, "pre_feedforward_layernorm")
        else ("post_attention_layernorm")
    )
    slices = {
        "q": [
            *_linear(attn.q_proj, 0, head_dim, w.heads),
            Slice(attn.o_proj, "weight", 1, head_dim, w.heads),
        ],
        "kv": [
            *_linear(attn.k_proj, 0, head_dim, w.kv_heads),
            *_linear(attn.v_proj, 0, head_dim, w.kv_heads),
        ],
        "neuron": [
            *_linear(mlp.gate_proj, 0, 1, w.intermediate),
            *_linear(mlp.up_proj, 0, 1, w.intermediate),
            Slice(mlp.down_proj, "weight", 1, 1, w.intermediate),
        ],
        "hidden": [
            *(Slice(m, "weight", 1, 1, h) for m in (attn.q_proj, attn.k_proj, attn.v_proj)),
            *_linear(attn.o_proj, 0, 1, h),
            *(Slice(m, "weight", 1, 1, h) for m in (mlp.gate_proj, mlp.up_proj)),
            *_linear(mlp.down_proj, 0, 1, h),
            *(s for m in norms for s in _norm(m, h)),
        ],
    }
    inputs = [block.input_layernorm, getattr(block, second)]
    return Block(block, slices, attn.o_proj, mlp.down_proj, inputs, norms)


def _gpt2_block(block: nn.Module, w: Widths, head_dim: int) -> Block:
    attn, mlp, h = block.attn, block.mlp, w.hidden
    inner = w.heads * head_dim
    slices = {
        "q": [
            *_linear(attn.c_attn, 1, head_dim, w.heads),
            Slice(attn.c_proj, "weight", 0, head_dim, w.heads),
        ],
        "kv": [
            *_linear(attn.c_attn, 1, head_dim, w.heads, inner),
            *_linear(attn.c_attn, 1, head_dim, w.heads, 2 * inner),
        ],
        "neuron": [
            *_linear(mlp.c_fc, 1, 1, w.intermediate),
            Slice(mlp.c_proj, "weight", 0, 1, w.intermediate),
        ],
        "hidden": [
            Slice(attn.c_attn, "weight", 0, 1, h),
            *_linear(attn.c_proj, 1, 1, h),
            Slice(mlp.c_fc, "weight", 0, 1, h),
            *_linear(mlp.c_proj, 1, 1, h),
            *_norm(block.ln_1, h),
            *_norm(block.ln_2, h),
        ],
    }
    norms = [block.ln_1, block.ln_2]
    return Block(block, slices, attn.c_proj, mlp.c_proj, norms, norms)


def _require_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED or not hasattr(model, "lm_head"):
        raise IncompatibleLayerError(
            f"{type(model).__name__} (model_type {model_type!r}) is not supported by width and "
            f"depth pruning, which rewrites the config of: {', '.join(SUPPORTED)} causal LMs; "
            "Fix: pass a ...ForCausalLM of one of these architectures."
        )
    if model_type == "gpt2" and getattr(config, "add_cross_attention", False):
        raise IncompatibleLayerError(
            "GPT-2 with cross-attention (config.add_cross_attention) is not supported; Fix: "
            "pass a decoder-only GPT-2."
        )
    return model_type


def widths_of(config: object) -> tuple[Widths, int]:
    """``(widths, head_dim)`` as the config states them."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return Widths(heads, kv, intermediate or 4 * hidden, hidden), head_dim


def describe(model: nn.Module) -> Anatomy:
    """The :class:`Anatomy` of a supported causal LM (module docstring).

    Raises:
        IncompatibleLayerError: an architecture outside :data:`SUPPORTED`.
    """
    require_model(model)
    model_type = _require_type(model)
    widths, head_dim = widths_of(model.config)
    gpt2 = model_type == "gpt2"
    base = model.transformer if gpt2 else model.model
    blocks = base.h if gpt2 else base.layers
    build = _gpt2_block if gpt2 else _llama_block
    layers = [build(b, widths, head_dim) for b in blocks]
    embeds = [base.wte, base.wpe] if gpt2 else [base.embed_tokens]
    final = base.ln_f if gpt2 else base.norm
    outer = [
        *(Slice(e, "weight", 1, 1, widths.hidden) for e in embeds),
        *_norm(final, widths.hidden),
        Slice(model.lm_head, "weight", 1, 1, widths.hidden),
    ]
    path = "transformer.h" if gpt2 else "model.layers"
    return Anatomy(
        model, model_type, path, blocks, widths, head_dim, layers, outer, [final], embeds[0]
    )


def param_count(model: nn.Module) -> int:
    """Parameters of ``model``, each tensor counted once (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def counted_size(anatomy: Anatomy, keep: Widths, drop: frozenset[int] = frozenset()) -> int:
    """Parameters the model would have with widths ``keep`` and blocks ``drop`` removed,
    counted from the slices (exact, without touching the model)."""
    keep_of = {
        "q": keep.heads,
        "kv": keep.kv_heads,
        "neuron": keep.intermediate,
        "hidden": keep.hidden,
    }
    shapes: dict[int, list[int]] = {}
    owners: dict[int, int] = {}  # tensor id -> block index (-1 outside blocks)
    for index, block in enumerate(anatomy.layers):
        for p in block.module.parameters():
            owners[id(p)] = index
    for axis, sl in all_slices(anatomy):
        shape = shapes.setdefault(id(sl.tensor), list(sl.tensor.shape))
        shape[sl.dim] -= (sl.count - keep_of[axis]) * sl.unit
    return sum(
        math.prod(shapes.get(id(p), p.shape))
        for p in anatomy.model.parameters()
        if owners.get(id(p), -1) not in drop
    )


def all_slices(anatomy: Anatomy) -> Iterator[tuple[str, Slice]]:
    """``(axis, slice)`` for every slice of every block, then the hidden axis once per tensor."""
    for block in anatomy.layers:
        for axis in ("q", "kv", "neuron"):
            for sl in block.slices[axis]:
                yield axis, sl
    for sl in anatomy.hidden_slices():
        yield "hidden", sl
