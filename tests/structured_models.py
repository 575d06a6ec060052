"""Models and checks shared by the structured-pruning tests."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.inputs import Inputs, call
from prunekit.structured import build, plan, score
from prunekit.structured.surgery import group_masked, remove
from prunekit.zoo.hf import tiny_transformer


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
    masked = group_masked(model, graph, removed)
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


def hf_model(name: str) -> tuple[nn.Module, dict[str, Tensor]]:
    """A tiny transformers model (BatchNorms randomised) and its example inputs."""
    model, inputs = tiny_transformer(name)
    return randomize_norms(model), inputs
