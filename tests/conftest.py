"""Shared fixtures: small models covering every prunable layer type."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models train faster on one thread than
    fighting over two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave untouched: tensors, parametrizations, hooks, modes."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [type(m) for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "training": [m.training for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["hooks"] == before["hooks"]
    assert after["training"] == before["training"]
    assert all(a is None for a in after["grads"]) or after["grads"] == before["grads"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0, equal_nan=True)


class ConvNet(nn.Module):
    """Conv2d, depthwise Conv2d, Conv1d-free path, ConvTranspose2d and Linear in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.relu(self.depthwise(x))
        x = self.up(x)
        return self.head(x.mean((2, 3)))


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8)
    )


@pytest.fixture
def convnet() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet()


def small_cnn() -> nn.Module:
    """Conv-BatchNorm-Conv-Linear, seeded: the small net the hostile-file and bad-input
    suites shrink, save and load."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 4),
    )  # fmt: skip


class Interrupt(Exception):
    """Stands for a kill right after a round's checkpoint."""


@contextlib.contextmanager
def killed_after_round(k: int = 1) -> Iterator[None]:
    """The pipeline run inside the block is 'killed' (raises :class:`Interrupt`, which the
    block expects) right after round ``k``'s checkpoint is saved."""
    from prunekit.training import checkpoint

    save_round = checkpoint.save_round

    def stop(directory, round, *args, **kwargs):
        save_round(directory, round, *args, **kwargs)
        if round == k:
            raise Interrupt

    checkpoint.save_round = stop
    try:
        with pytest.raises(Interrupt):
            yield
    finally:
        checkpoint.save_round = save_round


def tiny_llama(blocks: int = 2, vocab: int = 64) -> nn.Module:
    """A seeded Llama of hidden 32 (4 / 2 heads, MLP 64) built offline from its config;
    the calling test is skipped without transformers."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=blocks, vocab_size=vocab,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)
