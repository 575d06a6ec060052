"""The MAC counter's shortcuts (prunekit.cost_shortcuts) count what watching counts.

A convolution, linear layer or matmul counted from its shapes, and the elementwise /
normalisation / pooling functions counted as 0 without watching, give FlopCounterMode's
totals for every shape drawn (batched or not, grouped, strided, dilated, 'same' padding,
broadcast matmuls), in count_macs and in the traced pass; calls a formula does not cover
(unbatched convolutions, vector products, tensor subclasses, TorchScript) are watched and
still counted; covered calls really run unwatched.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from prunekit import cost
from prunekit.cost import count_macs, macs_per_module
from prunekit.structured.trace import trace


def assert_counts(model: nn.Module, x: torch.Tensor) -> None:
    expected = macs_per_module(model, x)[1]  # FlopCounterMode, watching every operation
    assert count_macs(model, x) == expected
    assert trace(model, x, macs=True).macs == expected


class Conv(nn.Module):
    def __init__(self, dims: int, groups: int, padding: int | str, stride: int, dilation: int):
        super().__init__()
        kind = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        self.conv = kind(4, 6, 3, stride=stride if padding != "same" else 1, padding=padding,
                         dilation=dilation, groups=groups)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x)) + 1


@settings(max_examples=25, deadline=None)
@given(
    dims=st.integers(1, 3), batched=st.booleans(), groups=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1, "same"]), stride=st.integers(1, 2),
    dilation=st.integers(1, 2), batch=st.integers(1, 3),
)  # fmt: skip
def test_convolutions_count_as_watched(dims, batched, groups, padding, stride, dilation, batch):
    model = Conv(dims, groups, padding, stride, dilation).eval()
    shape = (4,) + (7,) * dims
    assert_counts(model, torch.randn((batch, *shape) if batched else shape))


class Mixed(nn.Module):
    """Linear over any leading dims, a matmul of two activations, norms and pools."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm = nn.Linear(5, 6), nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.norm(self.linear(x)))
        if y.dim() >= 2:
            y = y @ y.transpose(-1, -2) @ y  # (..., n, 6) products, batched when x is
        return F.dropout(y, 0.1, training=False).mean()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=0, max_size=3))
def test_linear_and_matmul_count_as_watched(lead: list[int]) -> None:
    assert_counts(Mixed().eval(), torch.randn(*lead, 5))


@pytest.mark.parametrize(
    ("a", "b"), [((3, 4), (4, 2)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4, 3))]
)
def test_broadcast_and_vector_matmuls(a: tuple, b: tuple) -> None:
    class Product(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(b))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.matmul(x, self.w)

    assert_counts(Product().eval(), torch.randn(a))


def test_scripted_and_subclass_calls_are_watched_and_counted() -> None:
    """TorchScript runs aten operations no torch function announces, and a subclass may
    run others: both still counted (watched)."""

    class Tagged(torch.Tensor):
        pass

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scripted = torch.jit.script(nn.Linear(8, 8))
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scripted(self.conv(x).mean((2, 3)))

    model, x = Model().eval(), torch.randn(2, 3, 6, 6)
    expected = macs_per_module(model, x)[1]
    assert expected == 2 * 8 * 27 * 16 + 2 * 64  # conv (16 positions) + linear
    assert count_macs(model, x) == expected
    assert count_macs(model, x.as_subclass(Tagged)) == expected


def test_covered_calls_run_unwatched(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batched convolution, its batch norm and ReLU are not seen by the dispatch mode;
    an unbatched convolution is."""
    seen: list[str] = []
    watch = cost.MacCounter.__torch_dispatch__

    def spy(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        seen.append(func.__name__)
        return watch(self, func, types, args, kwargs)

    monkeypatch.setattr(cost.MacCounter, "__torch_dispatch__", spy)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    assert count_macs(model, torch.randn(1, 3, 5, 5)) == 4 * 27 * 9
    assert not [n for n in seen if "convolution" in n or "batch_norm" in n or "relu" in n]
    assert count_macs(model[0], torch.randn(3, 5, 5)) == 4 * 27 * 9
    assert any("convolution" in n for n in seen)
