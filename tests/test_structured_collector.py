"""``pk.shrink`` pauses Python's garbage collector for its own work only: the caller's
setting comes back (on success and on error), and the user's data loop runs with it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import InvalidSparsityError
from prunekit.structured import collector


class Net(nn.Module):
    """Records whether the collector ran during each forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
        self.collecting: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.collecting.append(gc.isenabled())
        return self.b(torch.relu(self.a(x))).mean((2, 3))


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    gc.enable() if was else gc.disable()


def test_shrink_runs_without_the_collector_and_gives_it_back(collector_on: None) -> None:
    model = Net().eval()
    pk.shrink(model, torch.randn(1, 3, 8, 8), ratio=0.5)
    assert model.collecting and not any(model.collecting)  # trace, reference, check
    assert gc.isenabled()


def test_the_collector_comes_back_when_shrink_refuses(collector_on: None) -> None:
    with pytest.raises(InvalidSparsityError, match="no masked channel group"):
        pk.shrink(Net().eval(), torch.randn(1, 3, 8, 8))  # nothing masked, no ratio
    assert gc.isenabled()


def test_a_caller_without_the_collector_keeps_it_off() -> None:
    was = gc.isenabled()
    gc.disable()
    try:
        model = Net().eval()
        data = [(torch.randn(2, 3, 8, 8), torch.randn(2, 2))]
        pk.shrink(model, torch.randn(1, 3, 8, 8), ratio=0.5, criterion="taylor", data=data,
                  loss_fn=nn.functional.mse_loss)  # fmt: skip
        assert not any(model.collecting) and not gc.isenabled()
    finally:
        gc.enable() if was else gc.disable()


def test_the_users_data_loop_runs_with_the_collector(collector_on: None) -> None:
    """``data=``: the user's batches and loss (many passes) run as the caller had it."""
    seen: list[bool] = []

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append(gc.isenabled())
        return nn.functional.mse_loss(out, target)

    model = Net().eval()
    data = [(torch.randn(2, 3, 8, 8), torch.randn(2, 2)) for _ in range(3)]
    pk.shrink(model, torch.randn(1, 3, 8, 8), ratio=0.5, criterion="taylor", data=data,
              loss_fn=loss)  # fmt: skip
    assert seen == [True] * 3
    assert True in model.collecting and False in model.collecting  # data loop vs trace
    assert gc.isenabled()


def test_as_caller_outside_a_paused_call_changes_nothing(collector_on: None) -> None:
    with collector.as_caller():
        assert gc.isenabled()
    gc.disable()
    with collector.as_caller():
        assert not gc.isenabled()
    gc.enable()


def test_nested_paused_calls_keep_the_outermost_callers_setting(collector_on: None) -> None:
    @collector.pausing
    def inner() -> bool:
        with collector.as_caller():
            return gc.isenabled()

    @collector.pausing
    def outer() -> tuple[bool, bool]:
        return inner(), gc.isenabled()

    assert outer() == (True, False)
    assert gc.isenabled()
