"""prunekit.cost counts MACs from shapes (the model run on ``meta`` tensors): the counts
equal those of the real forward pass under the same counter, per module and in total,
on every transformers architecture of the structured suite, on nn.MultiheadAttention
before and after its heads are pruned, and on the zoo; a model that needs values falls
back to the real forward, and a lazily filled cache is not left holding ``meta`` tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from test_structured_hf import MODELS, build_model
from test_structured_mha import encoder
from torch import Tensor, nn

import prunekit as pk
from prunekit import cost
from prunekit.inputs import Inputs, call
from prunekit.zoo import MODELS as ZOO
from prunekit.zoo import build_model as build_zoo
from prunekit.zoo import example_input


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def assert_counts_equal(model: nn.Module, inputs: Inputs) -> None:
    """Meta and real forward passes, one counter and one set of modes (cost's own)."""
    on_shapes = cost._counted(model, inputs, cost._call_on_shapes).get_flop_counts()
    real = cost._counted(model, inputs, call).get_flop_counts()
    totals = {name: sum(ops.values()) for name, ops in real.items()}
    assert {name: sum(ops.values()) for name, ops in on_shapes.items()} == totals
    assert totals["Global"] > 0
    assert cost.count_macs(model, inputs) == totals["Global"] // 2
    assert all(p.device.type == "cpu" for p in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_transformers_architectures(name: str) -> None:
    assert_counts_equal(*build_model(name))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo(name: str) -> None:
    assert_counts_equal(build_zoo(name).eval(), example_input(name, 2))


def test_multihead_attention_before_and_after_head_pruning() -> None:
    """The fused attention counted by its formula, and the unpacked head-pruned module."""
    model, x = encoder(), torch.randn(2, 10, 32)
    assert_counts_equal(model, x)
    small = copy.deepcopy(model)
    report = pk.shrink(small, x, ratio=0.5)
    assert_counts_equal(small, x)
    assert report.macs_after == cost.count_macs(small, x) < report.macs_before


class ReadsValues(nn.Module):
    """Control flow on a value: cannot run on shapes alone."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        return self.fc(y) if bool(y.sum() > -1e9) else y


class LazyCache(nn.Module):
    """Fills a plain attribute on its first call (as some rotary embeddings do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.table: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.table is None:
            self.table = torch.ones_like(x)
        return self.fc(x * self.table)


def test_a_model_reading_values_is_counted_on_its_real_forward() -> None:
    assert pk.cost.count_macs(ReadsValues(), torch.randn(2, 8)) == 2 * 2 * 8 * 8


def test_a_lazy_cache_is_not_left_on_meta() -> None:
    model, x = LazyCache(), torch.randn(2, 8)
    assert cost.count_macs(model, x) == 2 * 8 * 8
    assert model.table is None
    assert torch.equal(model(x), model.fc(x))
