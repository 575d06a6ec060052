"""pk.shrink's check cannot be blind: it is relative to the outputs' scale, strengthens
itself when zeroing the removed groups barely moves the outputs, says when it stayed
weak, and refuses NaN / inf weights before anything runs."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import zoo
from prunekit.errors import ShrinkVerificationError
from prunekit.structured.masked import group_masked_tensors, swapped
from prunekit.structured.surgery import remove, size_attributes
from prunekit.structured.verify import restore, snapshot
from prunekit.zoo import build_model, example_input

shrink_module = importlib.import_module("prunekit.structured.shrink")


def torchvision_init(model: nn.Module) -> nn.Module:
    """torchvision's MobileNetV2 initialisation, seeded: its outputs at init are ~1e-4."""
    torch.manual_seed(0)
    return zoo.torchvision_init(model).eval()


def corrupt_after_removal(
    monkeypatch: pytest.MonkeyPatch, damage: Callable[[nn.Module], None]
) -> None:
    """Make shrink's surgery wrong: ``damage`` runs on the model right after removal."""

    def broken(model, graph, removed, *made):
        out = remove(model, graph, removed, *made)
        with torch.no_grad():
            damage(model)
        return out

    monkeypatch.setattr(shrink_module, "remove", broken)


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def swap_two_filters(model: nn.Module) -> None:
    w = first_conv(model).weight
    w[[0, 1]] = w[[1, 0]].clone()


def scale_one_filter(model: nn.Module) -> None:
    first_conv(model).weight[0] *= 1.01


@pytest.mark.parametrize("damage", [swap_two_filters, scale_one_filter])
def test_a_corrupted_surgery_on_tiny_outputs_is_caught(monkeypatch, damage) -> None:
    model = torchvision_init(build_model("mobilenetv2"))
    x = example_input("mobilenetv2", 2)
    with torch.no_grad():
        y = model(x)
    assert y.abs().max() < 1e-3  # an absolute tolerance of 1e-5 would be 1% or more here
    before = copy.deepcopy(model.state_dict())
    corrupt_after_removal(monkeypatch, damage)
    with pytest.raises(ShrinkVerificationError, match="of their scale"):
        pk.shrink(model, x, ratio=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert first_conv(model).out_channels == 16


def test_the_uncorrupted_shrink_passes_with_its_deviation() -> None:
    model = torchvision_init(build_model("mobilenetv2"))
    report = pk.shrink(model, example_input("mobilenetv2", 2), ratio=0.5)
    assert report.deviation is not None and report.deviation < 1e-5
    assert not report.notes


class ZeroInputNet(nn.Module):
    """Bias-free: on all-zero example inputs every output is 0 whatever the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_weak_check_draws_random_inputs_and_catches_the_corruption(monkeypatch) -> None:
    torch.manual_seed(0)
    model, x = ZeroInputNet().eval(), torch.zeros(2, 3, 8, 8)
    corrupt_after_removal(monkeypatch, swap_two_filters)
    with pytest.raises(ShrinkVerificationError, match="random inputs at 1x scale"):
        pk.shrink(model, x, ratio=0.5)
    assert model.conv.out_channels == 8


class DeadBranch(nn.Module):
    """The pruned neurons never reach the output (multiplied by 0): no input helps."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.skip = nn.Linear(6, 16), nn.Linear(16, 4), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + 0 * self.fc2(torch.relu(self.fc1(x)))


def test_a_check_that_stays_weak_says_so() -> None:
    torch.manual_seed(0)
    model = DeadBranch().eval()
    report = pk.shrink(model, torch.randn(3, 6), ratio=0.5)
    assert model.fc1.out_features == 8
    (note,) = report.notes
    assert "verify was weak" in note and "random inputs at 10x scale" in note
    assert report.deviation == 0.0


@pytest.mark.parametrize(("std", "tried"), [(0.1, "1x scale, random inputs at 10x"), (3.0, "")])
def test_the_1x_draw_is_skipped_at_the_example_inputs_own_scale(std: float, tried: str) -> None:
    """At std >= 0.9 a 1x draw, N(0, max(1, std)^2), repeats the example inputs' scale."""
    torch.manual_seed(0)
    model, x = DeadBranch().eval(), torch.randn(64, 6)
    report = pk.shrink(model, x / x.std() * std, ratio=0.5)
    (note,) = report.notes
    assert ("random inputs at 1x scale" in note) == bool(tried)
    assert tried in note and "random inputs at 10x scale" in note


def test_already_zero_groups_are_checked_against_refilled_ones(monkeypatch) -> None:
    """ratio=None removes groups that are zero already, so the dense model equals the
    masked one; the check's reference refills them with noise instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[::2] = 0
        model[0].bias[::2] = 0
    report = pk.shrink(copy.deepcopy(model), torch.randn(3, 6), ratio=None)
    assert report.families[0].kept == 8 and not report.notes

    def shift(m: nn.Module) -> None:
        m[0].bias[0] += 1e-3 * m[0].bias.abs().max()

    corrupt_after_removal(monkeypatch, shift)
    with pytest.raises(ShrinkVerificationError):
        pk.shrink(model, torch.randn(3, 6), ratio=None)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_up_front(value: float) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[2].weight[1, 3] = value
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(pk.InvalidWeightError, match=rf"layer '2' .*\({value}\) in '2.weight'"):
        pk.shrink(model, torch.randn(2, 8), verify=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items() if k != "2.weight")
    assert model[0].out_features == 16


def test_large_finite_weights_whose_sums_overflow_are_accepted() -> None:
    """Finite values whose sum overflows (float16 near its max, beside float32 layers) are
    settled element by element, not refused; a NaN among them still is."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    model[0].register_buffer("scale", torch.full((64,), 6e4, dtype=torch.float16))
    pk.shrink(model, torch.randn(2, 8), ratio=0.5, verify=False)
    assert model[0].out_features == 8
    model[0].scale[5] = float("nan")
    with pytest.raises(pk.InvalidWeightError, match=r"'0.scale'"):
        pk.shrink(model, torch.randn(2, 8), ratio=0.5, verify=False)


def test_non_finite_batchnorm_statistics_are_named() -> None:
    model = build_model("resnet20").eval()
    model.bn1.running_var[2] = float("inf")
    with pytest.raises(pk.InvalidWeightError, match=r"'bn1.running_var'"):
        pk.shrink(model, example_input("resnet20"))


def test_the_group_masked_reference_leaves_the_model_untouched() -> None:
    """The reference computes with masked copies swapped in: a tied weight is masked once
    under both names, and the very parameter objects, values unchanged, come back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4), nn.Linear(4, 6)).eval()
    model[3].weight = model[0].weight  # tied
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objects = [model[0].weight, model[0].bias, model[2].weight]
    positions = {("0.weight", 0): torch.tensor([1, 4]), ("0.bias", 0): torch.tensor([1, 4]),
                 ("2.weight", 1): torch.tensor([1, 4])}  # fmt: skip
    masked = group_masked_tensors(model, positions)
    assert masked["0.weight"] is masked["3.weight"]
    assert not masked["0.weight"][[1, 4]].any() and torch.equal(
        masked["0.weight"][[0, 2, 3, 5]], before["0.weight"][[0, 2, 3, 5]]
    )
    x = torch.randn(3, 4)
    with swapped(model, masked), torch.no_grad():
        assert model[3].weight is masked["3.weight"]
        y = model(x)
    now = [model[0].weight, model[0].bias, model[2].weight]
    assert all(a is b for a, b in zip(now, objects, strict=True))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    hidden = torch.relu(x @ masked["0.weight"].T + masked["0.bias"])
    expected = (hidden @ masked["2.weight"].T + model[2].bias) @ masked["0.weight"].T
    assert torch.allclose(y, expected + model[3].bias, atol=1e-6)


def test_size_attributes_read_own_and_class_level_ones_and_restore_undoes_them() -> None:
    """Instance attributes and properties (read through the class) are both found, other
    names are not; a snapshot puts back every one a removal changed."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.inner_dim = nn.Linear(8, 8), 8

        @property
        def num_heads(self) -> int:
            return self.inner_dim // 2

        @num_heads.setter
        def num_heads(self, value: int) -> None:
            self.inner_dim = 2 * value

    model = Heads()
    assert size_attributes(model) == {"num_heads": 4, "inner_dim": 8}
    assert size_attributes(model.proj) == {"in_features": 8, "out_features": 8}
    saved = snapshot(model)
    model.num_heads, model.proj.out_features = 3, 6
    restore(model, saved)
    assert (model.num_heads, model.inner_dim, model.proj.out_features) == (4, 8, 8)
