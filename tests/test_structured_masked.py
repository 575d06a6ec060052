"""verify's group-masked reference zeroes activations around Conv / Linear / BatchNorm
instead of copying their weights: it must compute exactly what zeroing the weights
computes, and fall back to weight copies wherever the arithmetic is not known."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from structured_models import randomize_norms
from torch import nn

import prunekit as pk
from prunekit.errors import ShrinkVerificationError
from prunekit.inputs import call
from prunekit.structured import build, plan, score
from prunekit.structured.masked import group_masked_tensors, hooked, masking, swapped
from prunekit.structured.surgery import Slices
from prunekit.zoo import build_model, example_input
from prunekit.zoo.hf import tiny_transformer

Positions = dict[tuple[str, int], torch.Tensor]
masked_module = importlib.import_module("prunekit.structured.masked")


@pytest.fixture(autouse=True)
def every_size_hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test models are small: hook layers of any size (one test checks the size)."""
    monkeypatch.setattr(masked_module, "HOOKED_NUMEL", 0)


def _by_copies(model: nn.Module, positions: Positions, inputs: object) -> torch.Tensor:
    with swapped(model, group_masked_tensors(model, positions)), torch.no_grad():
        return _first(call(model, inputs))


def _cut(model: nn.Module, positions: Positions) -> Slices:
    """What removing ``positions`` keeps, made here without a graph."""
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    kept: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (name, dim), index in positions.items():
        keep = torch.ones(tensors[name].shape[dim], dtype=torch.bool)
        keep[index] = False
        kept.setdefault(name, []).append((dim, keep.nonzero().flatten()))
    new = {}
    for name, cuts in kept.items():
        value = tensors[name].detach()
        for dim, index in cuts:
            value = value.index_select(dim, index)
        new[name] = value
    return Slices(kept, new)


def _by_hooks(
    model: nn.Module, positions: Positions, inputs: object, narrow: bool = False
) -> torch.Tensor:
    found = masking(model, positions)
    tensors = group_masked_tensors(model, found.rest)
    cut = _cut(model, positions) if narrow else None
    with swapped(model, tensors), hooked(model, found, cut), torch.no_grad():
        return _first(call(model, inputs))


def _first(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[return-value]


def _positions(model: nn.Module, inputs: object, ratio: float = 0.5) -> Positions:
    graph = build(model, inputs)
    decisions = plan(graph, score(model, graph, "l2"), ratio)
    return graph.positions({d.name: d.removed for d in decisions if d.removed})


@pytest.mark.parametrize("narrow", [False, True], ids=["zeroed", "narrowed"])
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vgg", "vit", "gpt"])
def test_hooks_compute_the_weight_masked_model(name: str, narrow: bool) -> None:
    """Zeroing activations, or (narrowed) computing the kept channels alone with the
    removal's tensors, computes what zeroing the weights computes."""
    torch.manual_seed(0)
    model = randomize_norms(build_model(name).eval())
    inputs = example_input(name, 2)
    positions = _positions(model, inputs)
    found = masking(model, positions)
    assert found.inputs or found.outputs  # the known layers are masked by hooks
    assert masked_module._narrowing(model, found, _cut(model, positions))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = _by_copies(model, positions, inputs)
    assert not torch.equal(expected, _first(call(model, inputs)))  # the masking matters
    found_now = _by_hooks(model, positions, inputs, narrow)
    torch.testing.assert_close(found_now, expected, rtol=0, atol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_transformer_layers_outside_the_known_ones_are_copied() -> None:
    model, inputs = tiny_transformer("llama-gqa")
    model.eval()
    positions = _positions(model, inputs)
    found = masking(model, positions)
    torch.testing.assert_close(
        _by_hooks(model, positions, inputs), _by_copies(model, positions, inputs), rtol=0,
        atol=1e-6,
    )  # fmt: skip
    assert found.inputs or found.outputs


class Scaled(nn.Linear):
    """A subclass computing otherwise: ``2 * linear(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def _routes(model: nn.Module, positions: Positions) -> tuple[set[str], set[str], set[str]]:
    found = masking(model, positions)
    return set(found.inputs), set(found.outputs), {n for n, _ in found.rest}


def test_only_known_arithmetic_is_masked_by_hooks() -> None:
    idx = torch.tensor([0, 2])
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
        nn.Linear(4, 4), Scaled(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4),
    )  # fmt: skip
    model[8].weight = model[7].weight  # tied
    model[6].register_forward_hook(lambda m, a, o: o)
    positions = {
        ("0.weight", 0): idx, ("0.bias", 0): idx, ("1.weight", 0): idx, ("1.bias", 0): idx,
        ("2.weight", 1): idx, ("4.weight", 0): idx, ("5.weight", 1): idx,
        ("6.weight", 1): idx, ("7.weight", 1): idx, ("1.running_mean", 0): idx,
    }  # fmt: skip
    inputs, outputs, rest = _routes(model, positions)
    assert outputs == {"0", "1"} and inputs == set()
    # grouped conv columns, rows without their bias, a subclass, own hooks, a tied weight
    assert rest == {"2.weight", "4.weight", "5.weight", "6.weight", "7.weight"}
    positions[("4.bias", 0)] = idx.flip(0)  # the same rows, in another order
    assert "4" in _routes(model, positions)[1]


@pytest.mark.parametrize("narrow", [False, True], ids=["zeroed", "narrowed"])
def test_input_masking_copies_the_callers_tensor_and_takes_keywords(narrow: bool) -> None:
    layer = nn.Linear(4, 3)
    positions = {("weight", 1): torch.tensor([1, 3])}
    found = masking(layer, positions)
    assert set(found.inputs) == {""}
    x = torch.randn(2, 4)
    kept = x.clone()
    with hooked(layer, found, _cut(layer, positions) if narrow else None), torch.no_grad():
        y_pos, y_kw = layer(x), layer(input=x)
    assert torch.equal(x, kept)
    expected = torch.nn.functional.linear(
        x * torch.tensor([1.0, 0, 1, 0]), layer.weight, layer.bias
    )
    torch.testing.assert_close(y_pos, expected)
    torch.testing.assert_close(y_kw, expected)


@pytest.mark.parametrize("narrow", [False, True], ids=["zeroed", "narrowed"])
def test_unbatched_convolution_is_masked_on_its_channels(narrow: bool) -> None:
    conv = nn.Conv1d(4, 3, 3)
    idx = torch.tensor([1])
    positions = {("weight", 1): idx, ("weight", 0): idx, ("bias", 0): idx}
    x = torch.randn(4, 7)  # (C, L): no batch dim
    found = masking(conv, positions)
    assert set(found.inputs) == set(found.outputs) == {""}
    with hooked(conv, found, _cut(conv, positions) if narrow else None), torch.no_grad():
        y = conv(x)
    torch.testing.assert_close(y, _by_copies(conv, positions, x))


@settings(max_examples=25, deadline=None)
@given(
    rows=st.sets(st.integers(0, 7), max_size=7),
    cols=st.sets(st.integers(0, 5), max_size=5),
    consumer=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_positions_of_an_mlp_match_weight_masking(
    rows: set, cols: set, consumer: bool, seed: int
) -> None:
    """Rows zeroed with or without the next layer's columns (without: only the zeroed
    outputs keep the removed channels out), any input columns."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    r, c = (
        torch.tensor(sorted(rows), dtype=torch.long),
        torch.tensor(sorted(cols), dtype=torch.long),
    )
    positions = {("0.weight", 0): r, ("0.bias", 0): r, ("0.weight", 1): c}
    if consumer:
        positions["2.weight", 1] = r
    x = torch.randn(5, 6)
    expected = _by_copies(model, positions, x)
    torch.testing.assert_close(_by_hooks(model, positions, x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(_by_hooks(model, positions, x, True), expected, rtol=0, atol=1e-6)


def test_small_layers_are_masked_by_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below ``HOOKED_NUMEL`` values a copy costs less than a hook."""
    monkeypatch.setattr(masked_module, "HOOKED_NUMEL", 100)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 9))  # 110 and 99 values
    idx = torch.tensor([3])
    positions = {("0.weight", 0): idx, ("0.bias", 0): idx, ("1.weight", 1): idx}
    assert _routes(model, positions) == (set(), {"0"}, {"1.weight"})


def test_hooks_common_to_all_modules_turn_activation_masking_off() -> None:
    """Such a hook sees a layer's output before its zeros: weight copies only."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    idx = torch.tensor([1])
    positions = {("0.weight", 0): idx, ("0.bias", 0): idx, ("1.weight", 1): idx}
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: o)
    try:
        assert _routes(model, positions) == (set(), set(), {"0.weight", "0.bias", "1.weight"})
    finally:
        handle.remove()
    assert _routes(model, positions) == ({"1"}, {"0"}, set())


class SharedConv(nn.Module):
    """One conv run as a module and, dilated, through ``F.conv2d`` on its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        dilated = nn.functional.conv2d(h, self.conv.weight, self.conv.bias, padding=2, dilation=2)
        return self.head(torch.relu(self.conv(h) + dilated))


class DirectForward(nn.Module):
    """``self.b.forward(x)`` called directly: the module's hooks do not run."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 128), nn.Linear(128, 128), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b.forward(torch.relu(self.a(x)))))


class WeightStatistic(DirectForward):
    """The output is scaled by a statistic of ``b``'s weight, which shrinking changes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.c(h) * (1 + 10 * self.b.weight.abs().mean())


def _narrowed_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = masked_module._narrow_forward

    def spy(module: nn.Module, narrow: object, input: torch.Tensor) -> torch.Tensor:
        calls.append(type(module).__name__)
        return real(module, narrow, input)

    monkeypatch.setattr(masked_module, "_narrow_forward", spy)
    return calls


@pytest.mark.parametrize(
    ("model", "x"), [(SharedConv, (2, 3, 8, 8)), (DirectForward, (3, 16))], ids=["conv", "linear"]
)
def test_model_code_using_a_narrowed_layers_weight_elsewhere_reads_it_whole(
    model: type[nn.Module], x: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A narrowed layer keeps its own parameters: a functional call on its weight, or its
    ``forward`` called directly, computes as in the group-masked model (not on the new,
    narrower weight next to full-width activations)."""
    torch.manual_seed(0)
    net, inputs = model().eval(), torch.randn(x)
    calls = _narrowed_calls(monkeypatch)
    report = pk.shrink(net, inputs, ratio=0.5)
    assert calls and report.deviation is not None and report.deviation < 1e-5


def test_a_statistic_of_a_narrowed_layers_weight_is_still_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reference reads the layer's weight whole, as the group-masked model does (zeros
    included), so an output scaled by its mean differs from the shrunk model's: refused."""
    torch.manual_seed(0)
    net, x = WeightStatistic().eval(), torch.randn(3, 16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls = _narrowed_calls(monkeypatch)
    with pytest.raises(ShrinkVerificationError, match="differ from the group-masked"):
        pk.shrink(net, x, ratio=0.5)
    assert calls
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
