"""Per-position sums of criterion contributions (prunekit.structured.units): summed over
every other dimension, leading dimensions first, they equal a float64 sum of the same
values for every shape, dim and dtype drawn, and come back as float64, one per position."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.structured.units import _per_position


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    pick=st.integers(0, 7),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
)
def test_per_position_sums_every_other_dimension(shape: list[int], pick: int, dtype) -> None:
    values = torch.randn(shape).to(dtype)
    dim = pick % len(shape) - (len(shape) if pick >= 4 else 0)  # negative dims too
    others = [d for d in range(len(shape)) if d != dim % len(shape)]
    want = values.double().sum(others) if others else values.double()
    got = _per_position(values, dim)
    assert got.dtype == torch.float64 and got.shape == (shape[dim],)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
