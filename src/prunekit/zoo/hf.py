"""Tiny Hugging Face transformers models built from configs (random weights, offline).

``tiny_transformer(name)`` returns ``(model, example_inputs)`` for one of
:data:`TRANSFORMERS`: BERT, GPT-2 (Conv1D), Llama with grouped-query attention, ViT,
ResNet and ConvNeXt. They exercise the real transformers code paths at test speed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from prunekit.errors import UnknownChoiceError

BATCH = 2  # rows of every example input


def _ids() -> Tensor:
    return torch.randint(0, 100, (BATCH, 12), generator=torch.Generator().manual_seed(0))


def _image() -> Tensor:
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _bert() -> tuple[nn.Module, dict[str, Tensor]]:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64)  # fmt: skip
    return BertModel(cfg), {"input_ids": _ids()}


def _gpt2() -> tuple[nn.Module, dict[str, Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg), {"input_ids": _ids(), "use_cache": False}


def _llama() -> tuple[nn.Module, dict[str, Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=64)  # fmt: skip
    return LlamaForCausalLM(cfg), {"input_ids": _ids(), "use_cache": False}


def _vit() -> tuple[nn.Module, dict[str, Tensor]]:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=5)  # fmt: skip
    return ViTForImageClassification(cfg), {"pixel_values": _image()}


def _resnet() -> tuple[nn.Module, dict[str, Tensor]]:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                       layer_type="bottleneck", num_labels=5)  # fmt: skip
    return ResNetForImageClassification(cfg), {"pixel_values": _image()}


def _convnext() -> tuple[nn.Module, dict[str, Tensor]]:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=5)
    return ConvNextForImageClassification(cfg), {"pixel_values": _image()}


TRANSFORMERS: dict[str, Callable[[], tuple[nn.Module, dict[str, Tensor]]]] = {
    "bert": _bert,
    "gpt2": _gpt2,
    "llama-gqa": _llama,
    "vit": _vit,
    "resnet": _resnet,
    "convnext": _convnext,
}


def tiny_transformer(name: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """A tiny transformers model ``name`` (seeded weights) and keyword example inputs
    (:data:`BATCH` rows)."""
    if name not in TRANSFORMERS:
        raise UnknownChoiceError("transformers model", name, sorted(TRANSFORMERS))
    torch.manual_seed(seed)
    model, inputs = TRANSFORMERS[name]()
    return model.eval(), inputs
