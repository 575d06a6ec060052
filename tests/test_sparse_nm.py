"""Compressed N:M storage: exact round trips, the bit layout, byte counts, safetensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from prunekit.analysis.profile import nm_bytes
from prunekit.errors import CheckpointError, IncompatibleLayerError, NotNMError
from prunekit.granularity import nm_mask_topn
from prunekit.sparse import NMLinear, NMTensor
from prunekit.sparse.nm import index_bits

PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (1, 3), (2, 8), (4, 8), (5, 16)]


def nm_weight(rows: int, groups: int, n: int, m: int, extra_zeros: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, groups * m, generator=gen)
    keep = nm_mask_topn(weight.abs().reshape(-1, m), n, m).reshape(weight.shape)
    keep &= torch.rand(weight.shape, generator=gen) >= extra_zeros  # some groups < n kept
    return weight * keep


@settings(max_examples=60, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    rows=st.integers(1, 9),
    groups=st.integers(1, 7),
    extra_zeros=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact_and_bytes_match_profile(pattern, rows, groups, extra_zeros, seed):
    n, m = pattern
    weight = nm_weight(rows, groups, n, m, extra_zeros, seed)
    packed = NMTensor.compress(weight, n, m)
    assert torch.equal(packed.to_dense(), weight)
    assert packed.values.shape == (rows, groups * n)
    assert packed.nbytes == nm_bytes(weight.numel(), 4, n, m)
    assert packed.metadata.numel() == -(-rows * groups * n * index_bits(m) // 8)
    positions = packed.positions()
    assert bool((positions[..., 1:] > positions[..., :-1]).all())  # ascending, distinct


def test_bit_layout_of_a_small_example():
    weight = torch.tensor([[0.0, 3.0, 0.0, 5.0, 7.0, 0.0, 0.0, 0.0]])
    packed = NMTensor.compress(weight, 2, 4)
    assert packed.values.tolist() == [[3.0, 5.0, 7.0, 0.0]]
    # positions 1, 3 | 0, 1 (a group with one nonzero keeps its first zero) -> 01 11 00 01
    assert packed.metadata.tolist() == [0b01110001]
    assert index_bits(4) == 2 and index_bits(3) == 2 and index_bits(8) == 3 and index_bits(2) == 1


def test_2_4_fp32_bytes_are_half_the_values_plus_metadata():
    weight = nm_weight(64, 16, 2, 4, 0.0, 0)  # 64 x 64
    packed = NMTensor.compress(weight, 2, 4)
    dense = weight.numel() * 4
    assert packed.values.numel() * 4 == dense // 2
    assert packed.metadata.numel() == weight.numel() // 2 * 2 // 8
    assert packed.nbytes / dense == 0.5 + 1 / 32  # 2 bits per kept value = 1/32 of 32 bits


def test_safetensors_round_trip(tmp_path):
    weight = nm_weight(8, 4, 2, 8, 0.2, 1)
    NMTensor.compress(weight, 2, 8).save(tmp_path / "w.safetensors")
    loaded = NMTensor.load(tmp_path / "w.safetensors")
    assert (loaded.shape, loaded.n, loaded.m) == ((8, 32), 2, 8)
    assert torch.equal(loaded.to_dense(), weight)


def test_nm_linear_state_dict_is_the_compressed_form():
    weight = nm_weight(16, 8, 2, 4, 0.0, 2)
    layer = NMLinear.from_dense(weight, 2, 4, bias=torch.zeros(16))
    assert set(layer.state_dict()) == {"bias", "values", "metadata"}
    fresh = NMLinear.from_spec(layer.spec())
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.to_dense(), weight)
    x = torch.randn(3, 32)
    torch.testing.assert_close(fresh(x), x @ weight.T, atol=1e-5, rtol=0)


def test_compress_errors():
    with pytest.raises(NotNMError, match=r"weight 1x8 is not 2:4: 1 group\(s\) of 4 hold more"):
        NMTensor.compress(torch.tensor([[1.0, 2, 3, 0, 1, 0, 0, 1]]), 2, 4)
    with pytest.raises(IncompatibleLayerError, match="m dividing the 6 columns"):
        NMTensor.compress(torch.zeros(2, 6), 2, 4)


def test_load_of_a_file_without_the_header_raises(tmp_path):
    save_file({"values": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match=r"no 'prunekit\.nm' header"):
        NMTensor.load(tmp_path / "plain.safetensors")
