"""Models and checks shared by the structured-pruning tests."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.inputs import Inputs, call
from prunekit.structured import build, plan, remove, score, zero_groups
from prunekit.structured.surgery import removed_groups


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 2 - 1)
    return model


def first_tensor(out: Any) -> Tensor:
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out


def masked_and_shrunk(
    model: nn.Module, inputs: Inputs, ratio: float, criterion: str = "l2", scope: str = "local"
) -> tuple[nn.Module, nn.Module, list[Any]]:
    """(group-masked copy, shrunk copy, decisions) of ``model`` at ``ratio``."""
    model.eval()
    graph = build(model, inputs)
    decisions = plan(graph, score(model, graph, criterion), ratio, scope)
    removed = {d.name: d.removed for d in decisions if d.removed}
    masked = copy.deepcopy(model)
    zero_groups(masked, removed_groups(graph, removed))
    small = copy.deepcopy(model)
    remove(small, graph, removed)
    return masked, small, decisions


def assert_equivalent(a: nn.Module, b: nn.Module, inputs: Inputs, atol: float = 1e-5) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        ya, yb = first_tensor(call(a, inputs)), first_tensor(call(b, inputs))
    assert ya.shape == yb.shape
    diff = (ya - yb).abs().max().item()
    assert diff <= atol, f"shrunk model differs from the group-masked one by {diff:.3g}"


def assert_trains(model: nn.Module, inputs: Inputs) -> None:
    """Forward and backward run; every parameter that gets a gradient has its own shape."""
    model.train()
    first_tensor(call(model, inputs)).float().square().mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.shape == p.shape, name
    model.zero_grad()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


HF_FACTORIES: dict[str, Callable[[], tuple[nn.Module, dict[str, Tensor]]]] = {}


def _hf(name: str):
    def register(fn):
        HF_FACTORIES[name] = fn
        return fn

    return register


_IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
_IMG = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@_hf("bert")
def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64)  # fmt: skip
    return BertModel(cfg), {"input_ids": _IDS}


@_hf("gpt2")
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg), {"input_ids": _IDS, "use_cache": False}


@_hf("llama-gqa")
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=64)  # fmt: skip
    return LlamaForCausalLM(cfg), {"input_ids": _IDS, "use_cache": False}


@_hf("vit")
def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=5)  # fmt: skip
    return ViTForImageClassification(cfg), {"pixel_values": _IMG}


@_hf("resnet")
def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                       layer_type="bottleneck", num_labels=5)  # fmt: skip
    return randomize_norms(ResNetForImageClassification(cfg)), {"pixel_values": _IMG}


@_hf("convnext")
def _convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=5)
    return ConvNextForImageClassification(cfg), {"pixel_values": _IMG}
