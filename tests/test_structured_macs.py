"""The trace counts MACs as prunekit.cost.count_macs does (one counter, the same modes):
on every transformers architecture of the structured suite, on the zoo, and on
nn.MultiheadAttention before and after its heads are pruned, the count taken inside the
traced forward pass equals count_macs' count, so pk.shrink needs no extra forward pass
for its "before" figure; batch norm, 0 MACs, is counted without being decomposed. The
lean total counter (cost.MacCounter) gives FlopCounterMode's totals on all of them."""

from __future__ import annotations

import copy

import pytest
import torch
from test_structured_hf import MODELS, build_model
from test_structured_mha import encoder
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import prunekit as pk
from prunekit import cost
from prunekit.cost import count_macs
from prunekit.inputs import Inputs, call, eval_mode
from prunekit.structured.trace import trace
from prunekit.zoo import MODELS as ZOO
from prunekit.zoo import build_model as build_zoo
from prunekit.zoo import example_input


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def decomposing_count(model: nn.Module, inputs: Inputs) -> int:
    """count_macs' modes and attention formula, batch norm left to FlopCounterMode (which
    decomposes it into elementwise operations it does not count)."""
    mapping = {kernel: cost._attention_flops for kernel in cost.ATTENTION_KERNELS}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with eval_mode(model), cost.unfused_attention(), counter, torch.no_grad():
        call(model, inputs)
    return counter.get_total_flops() // 2


def assert_trace_counts(model: nn.Module, inputs: Inputs) -> None:
    expected = count_macs(model, inputs)
    assert expected == decomposing_count(model, inputs) > 0
    assert cost.macs_per_module(model, inputs)[1] == expected  # FlopCounterMode's total
    assert trace(model, inputs, macs=True).macs == expected
    assert trace(model, inputs).macs is None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_transformers_architectures(name: str) -> None:
    assert_trace_counts(*build_model(name))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo(name: str) -> None:
    assert_trace_counts(build_zoo(name).eval(), example_input(name, 2))


def test_multihead_attention_before_and_after_head_pruning() -> None:
    """The fused attention is counted unfused in the trace too, and so is the unpacked
    head-pruned module; shrink's report agrees with count_macs."""
    model, x = encoder(), torch.randn(2, 10, 32)
    assert_trace_counts(model, x)
    small = copy.deepcopy(model)
    report = pk.shrink(small, x, ratio=0.5)
    assert_trace_counts(small, x)
    assert report.macs_before == count_macs(model, x)
    assert report.macs_after == count_macs(small, x) < report.macs_before


@pytest.mark.parametrize("verify", [True, False])
def test_shrink_reports_count_macs_counts(verify: bool) -> None:
    """Before: counted in the trace; after: in verify's forward pass, or by count_macs."""
    model, x = build_zoo("resnet20").eval(), example_input("resnet20", 2)
    small = copy.deepcopy(model)
    report = pk.shrink(small, x, ratio=0.5, verify=verify)
    assert report.macs_before == count_macs(model, x)
    assert report.macs_after == count_macs(small, x) < report.macs_before


def test_a_higher_order_operator_is_counted_as_flop_counter_mode_counts() -> None:
    """torch.cond (compiled by dynamo even in eager code) runs under the counter, its
    branches counted as FlopCounterMode counts them."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.cond(x.sum() > 0, lambda t: self.a(t), lambda t: self.a(t) * 2, (x,))
            return self.b(y)

    model, x = Branchy().eval(), torch.randn(2, 4)
    assert count_macs(model, x) == cost.macs_per_module(model, x)[1] > 0
