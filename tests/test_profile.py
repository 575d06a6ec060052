"""Tests of prunekit.analysis.profile: exact counts, bytes formulas, MACs, latency, hygiene."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.table import Table
from torch import nn
from torch.nn.utils import parametrize

import prunekit as pk
from prunekit.analysis import compare, measure_latency, profile
from prunekit.cost import csr_bytes, nm_bytes
from prunekit.errors import NoLayersError, PruningError
from prunekit.inputs import call_eval

BATCH = 3


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def x_mlp() -> torch.Tensor:
    return torch.randn(BATCH, 8)


class Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def test_mlp_exact_counts_bytes_and_macs() -> None:
    p = profile(mlp(), x_mlp(), latency=False)
    first, second = p.layers
    assert (first.name, first.kind, second.name) == ("0", "Linear", "2")
    assert (first.params, first.nonzero) == (8 * 16 + 16, 8 * 16 + 16)
    assert (second.params, second.weight_params) == (16 * 4 + 4, 16 * 4)
    assert first.dense_bytes == (8 * 16 + 16) * 4
    # CSR of the dense 16x8 weight: values + int32 columns + int32 row pointers, + bias.
    assert first.csr_bytes == 128 * 4 + 128 * 4 + 17 * 4 + 16 * 4
    # 2:4 of 128 fp32 values: 64 kept * 4 B + 64 * 2 bits of metadata, + bias.
    assert first.nm_bytes == 64 * 4 + 16 + 16 * 4
    assert first.macs == 8 * 16 * BATCH
    assert second.macs == 16 * 4 * BATCH
    assert p.total_macs == p.total.macs == (8 * 16 + 16 * 4) * BATCH
    assert p.effective_macs == p.total_macs
    assert p.total.params == 8 * 16 + 16 + 16 * 4 + 4
    assert p.total.dense_bytes == first.dense_bytes + second.dense_bytes
    assert p.latency_s is None


def test_zeroing_half_a_weight_changes_nonzeros_and_effective_macs_exactly() -> None:
    model = mlp()
    with torch.no_grad():
        model[0].weight[:8] = 0  # 8 of 16 output rows: half of the weight
    p = profile(model, x_mlp(), latency=False)
    first = p.layers[0]
    assert first.weight_nonzero == 64
    assert first.nonzero == 64 + 16
    assert first.sparsity == 0.5
    assert first.macs == 8 * 16 * BATCH  # dense kernels still multiply the zeros
    assert first.effective_macs == 8 * 16 * BATCH / 2
    assert p.effective_macs == p.total_macs - 8 * 16 * BATCH / 2
    assert first.csr_bytes == 64 * 4 + 64 * 4 + 17 * 4 + 16 * 4


def test_conv2d_macs() -> None:
    in_c, out_c, k, size = 3, 5, 3, 10
    model = nn.Sequential(nn.Conv2d(in_c, out_c, k))
    p = profile(model, torch.randn(1, in_c, size, size), latency=False)
    out_hw = size - k + 1
    assert p.layers[0].macs == out_hw * out_hw * out_c * in_c * k * k
    assert p.layers[0].nm_bytes is None  # 4 does not divide the 3 input channels
    assert p.total.nm_bytes is None


def test_parametrized_mask_counts_masked_weight() -> None:
    model = mlp()
    mask = torch.ones(16, 8)
    mask[:, :2] = 0
    parametrize.register_parametrization(model[0], "weight", Mask(mask))
    p = profile(model, x_mlp(), latency=False)
    assert p.layers[0].kind == "Linear"
    assert p.layers[0].weight_nonzero == 16 * 6
    assert p.layers[0].params == 16 * 8 + 16
    assert p.layers[0].macs == 8 * 16 * BATCH


def test_latency_positive_and_compare() -> None:
    model = mlp()
    before = profile(model, (x_mlp(),), min_run_time=0.01)
    assert isinstance(before.latency_s, float) and before.latency_s > 0
    assert measure_latency(model, x_mlp(), min_run_time=0.01) > 0
    with torch.no_grad():
        model[0].weight[:8] = 0
    after = profile(model, x_mlp(), latency=False)
    ratios = compare(before, after)
    assert ratios["params"] == 1.0 and ratios["macs"] == 1.0
    assert ratios["nonzero"] == (64 + 16 + 68) / (128 + 16 + 68)
    assert ratios["latency_s"] is None


def test_to_dict_json_and_rendering() -> None:
    p = profile(mlp(), x_mlp(), min_run_time=0.01)
    data = json.loads(json.dumps(p.to_dict()))
    assert data["total"]["name"] == "total" and len(data["layers"]) == 2
    assert isinstance(p.table(), Table) and isinstance(p.__rich__(), Table)
    text = str(p)
    assert "eff. MACs" in text and "Masked zeros do not make dense kernels faster" in text
    assert "ms" in text


def test_model_left_unchanged() -> None:
    model = mlp()
    model.train()
    model[2].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    profile(model, x_mlp(), min_run_time=0.01)
    assert model.training and model[0].training and not model[2].training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not nn.modules.module._global_forward_hooks
    assert not nn.modules.module._global_forward_pre_hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_call_eval_restores_every_modules_training_flag() -> None:
    model = mlp()
    model.train()
    model[2].eval()
    out = call_eval(model, x_mlp())
    assert not out.requires_grad
    assert model.training and model[0].training and not model[2].training


def test_shared_module_and_tied_weight() -> None:
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    p = profile(model, torch.randn(2, 8), latency=False)
    # named_modules lists the shared module once, as "0.0"; FlopCounterMode names it by
    # its last path ("Sequential.1.0") and counts both calls.
    assert [layer.name for layer in p.layers] == ["0.0"]
    assert p.layers[0].macs == 2 * 8 * 8 * 2

    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    p = profile(tied, torch.randn(1, 4), latency=False)
    assert p.total.params == 16  # a shared weight counts once in the total


def test_layer_selection_and_errors() -> None:
    p = profile(mlp(), x_mlp(), latency=False, layers="2")
    assert [layer.name for layer in p.layers] == ["2"]
    assert p.total_macs == (8 * 16 + 16 * 4) * BATCH  # whole model, unselected layers too
    with pytest.raises(NoLayersError):
        profile(nn.Sequential(nn.ReLU()), x_mlp(), latency=False)
    with pytest.raises(PruningError):
        nm_bytes(6, 4)


def test_nm_bytes_general() -> None:
    assert nm_bytes(8, 2, n=1, m=8) == 1 * 2 + math.ceil(1 * 3 / 8)
    assert nm_bytes(16, 4, n=4, m=4) == 16 * 4 + 4


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 24),
    st.integers(1, 24),
    st.booleans(),
    st.sampled_from([torch.float32, torch.float16, torch.float64]),
)
def test_linear_formulas_property(in_f: int, out_f: int, bias: bool, dtype: torch.dtype) -> None:
    model = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.rand_like(model.weight) + 0.5)
        model.weight[:, ::2] = 0
    layer = profile(model, torch.randn(2, in_f, dtype=dtype), latency=False).layers[0]
    elem = torch.finfo(dtype).bits // 8
    nnz = out_f * (in_f // 2)
    n_bias = out_f if bias else 0
    assert layer.params == in_f * out_f + n_bias
    assert layer.weight_nonzero == nnz
    assert layer.dense_bytes == layer.params * elem
    assert layer.csr_bytes == csr_bytes(nnz, out_f, elem) + n_bias * elem
    expected_nm = nm_bytes(in_f * out_f, elem) + n_bias * elem if in_f % 4 == 0 else None
    assert layer.nm_bytes == expected_nm
    assert layer.macs == 2 * in_f * out_f
    assert layer.effective_macs == pytest.approx(2 * nnz)


def test_profile_counts_layers_that_sparse_convert_replaced() -> None:
    """A converted model is profiled with its converted layers, counted from their dense
    equivalent: same params, nonzeros and sparsity as before the conversion."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    pk.prune(model, 0.9, include_output=True)
    x = torch.randn(2, 64)
    before = pk.analysis.profile(model, x, latency=False)
    pk.sparse.convert(model, "csr")
    after = pk.analysis.profile(model, x, latency=False)
    assert [r.name for r in after.layers] == [r.name for r in before.layers]
    for key in ("params", "nonzero", "weight_params", "weight_nonzero", "dense_bytes"):
        assert getattr(after.total, key) == getattr(before.total, key), key


def test_inputs_the_model_cannot_take_are_named() -> None:
    from prunekit.errors import InvalidInputsError

    with pytest.raises(InvalidInputsError, match=r"Sequential does not run on example_inputs"):
        profile(mlp(), torch.randn(2, 3), latency=False)


@pytest.mark.parametrize("seconds", [0, -1.0, float("nan"), float("inf"), 2**63, "1", True])
def test_min_run_time_is_a_finite_number_of_seconds_up_to_an_hour(seconds: object) -> None:
    with pytest.raises(PruningError, match=r"profile\.min_run_time="):
        profile(mlp(), x_mlp(), min_run_time=seconds)


def test_a_meta_device_model_is_refused_with_the_fix() -> None:
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(PruningError, match=r"meta device .*to_empty"):
        profile(model, x_mlp(), latency=False)
    with pytest.raises(PruningError, match=r"meta device .*to_empty"):
        pk.sparsity(model)
