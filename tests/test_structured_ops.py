"""Operations the tracer once refused or broke on: in-place ops (Swin V2's zeroed key
bias), einsum (MaxViT), topk / sort / gather off the channels (detection heads), roll and
channels-last padding (Swin, ConvNeXt), and branches that only run in training (the
auxiliary heads of GoogLeNet / Inception-v3). Each shrinks exactly."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from structured_models import assert_equivalent, assert_trains, masked_and_shrunk, randomize_norms
from torch import nn

import prunekit as pk
from prunekit.structured import build


class ZeroedKeyBias(nn.Module):
    """Swin V2 attention: the qkv bias is cloned and its key third zeroed in place."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2, self.head = nn.Linear(d, 32), nn.Linear(32, d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.qkv.bias.clone()
        third = bias.numel() // 3
        bias[third : 2 * third].zero_()
        qkv = F.linear(x, self.qkv.weight, bias)
        b, n, _ = x.shape
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q * 0.5).mul_(1.0) @ k.transpose(-2, -1)
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        y = self.proj(y)
        y.add_(x).mul_(0.5)
        h = self.fc1(y)
        h.mul_(torch.sigmoid(h)).sub_(0.1)  # in-place SiLU and shift on the MLP neurons
        return self.head(y + self.fc2(h))


class EinsumNet(nn.Module):
    """MaxViT-style einsum attention and an einsum projection by a weight."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(d, 24) / 4)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
        y = self.out(torch.einsum("bhqk,bkhd->bqhd", scores, v).reshape(b, n, -1))
        return self.head(torch.relu(torch.einsum("...d,dk->...k", x + y, self.w)))


class TopkGatherNet(nn.Module):
    """A detection-style head: top-k and sorted gathers over positions, never channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.fc = nn.Conv2d(16, 12, 1), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.bn(self.conv(x)))).flatten(2)  # (B, C, HW)
        top = h.topk(5, dim=-1).values
        order = h.argsort(dim=-1, descending=True)[..., :5]
        picked = h.gather(-1, order)
        values, _ = h.sort(dim=2)
        rolled = torch.roll(values, 3, dims=-1)[..., :5]
        return self.fc((top + picked + rolled).mean(-1))


class ChannelsLastPad(nn.Module):
    """ConvNeXt / Swin: pad the spatial dims of a (B, H, W, C) tensor, then a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.fc1, self.fc2 = nn.Conv2d(3, 8, 1), nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.stem(x).permute(0, 2, 3, 1))
        h = F.pad(torch.relu(h), (0, 0, 1, 1, 2, 0))  # pads W and H, never C
        return self.head(self.fc2(h).mean((1, 2)))


CASES = {
    "zero_ and in-place mul_/add_": (ZeroedKeyBias, (2, 5, 16)),
    "einsum": (EinsumNet, (2, 5, 16)),
    "topk, sort, gather, roll": (TopkGatherNet, (2, 3, 6, 6)),
    "pad channels-last": (ChannelsLastPad, (2, 3, 5, 5)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_operation_shrinks_exactly(case: str) -> None:
    torch.manual_seed(0)
    make, shape = CASES[case]
    model, x = randomize_norms(make()).eval(), torch.randn(*shape)
    masked, small, decisions = masked_and_shrunk(model, x, 0.5)
    assert any(d.removed for d in decisions), decisions
    assert_equivalent(masked, small, x)
    assert_trains(small, x)
    report = pk.shrink(copy.deepcopy(model), x, ratio=0.5)  # verify passes too
    assert report.params_after < report.params_before


def test_pad_of_the_channel_dimension_keeps_the_channels() -> None:
    class PadChannels(ChannelsLastPad):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.pad(self.fc1(self.stem(x).permute(0, 2, 3, 1)), (1, 1))  # pads C
            return self.head(self.fc2(torch.relu(h[..., 1:-1])).mean((1, 2)))

    graph = build(PadChannels().eval(), torch.randn(1, 3, 4, 4))
    assert "fc1" not in {f.name for f in graph.families}


def test_topk_over_the_channels_keeps_them() -> None:
    class TopChannels(TopkGatherNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv2(torch.relu(self.bn(self.conv(x)))).flatten(2)
            return self.fc(h.topk(12, dim=1).values.mean(-1))

    graph = build(TopChannels().eval(), torch.randn(1, 3, 4, 4))
    assert "conv2" not in {f.name for f in graph.families}
    assert "conv" in {f.name for f in graph.families}


class AuxHeadNet(nn.Module):
    """GoogLeNet-style: an auxiliary classifier that only runs in training."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.bn1(self.conv1(x)))
        out = self.fc(torch.relu(self.bn2(self.conv2(h))).mean((2, 3)))
        return (out, self.aux(h)) if self.training else out


def test_training_only_branches_are_traced_and_resized() -> None:
    torch.manual_seed(0)
    model, x = AuxHeadNet(), torch.randn(2, 3, 6, 6)
    model(x)  # materialise the lazy layer
    model = randomize_norms(model).eval()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    masked, small, _ = masked_and_shrunk(model, x, 0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # restored
    assert small.aux[0].in_channels == small.conv1.out_channels == 8
    assert small.aux[0].out_channels == 4  # the aux head's own channels are pruned too
    assert_equivalent(masked, small, x)
    masked.train(), small.train()
    with torch.no_grad():  # train mode: batch statistics, both heads
        for a, b in zip(masked(x), small(x), strict=True):
            assert (a - b).abs().max() < 1e-5
    pk.shrink(model, x, ratio=0.5)
    model.train()
    model(x)[1].sum().backward()


def test_verify_runs_training_only_branches(monkeypatch) -> None:
    """A surgery that breaks the aux head (only training runs it) is caught and undone."""
    shrink_module = importlib.import_module("prunekit.structured.shrink")
    remove = shrink_module.remove

    def broken(model, graph, removed, *made):
        out = remove(model, graph, removed, *made)
        model.aux[0].weight = nn.Parameter(model.aux[0].weight[:, :3].clone())
        return out

    torch.manual_seed(0)
    model, x = AuxHeadNet(), torch.randn(2, 3, 6, 6)
    model(x)
    model.eval()
    monkeypatch.setattr(shrink_module, "remove", broken)
    with pytest.raises(pk.PruningError, match="does not run in train mode"):
        pk.shrink(model, x, ratio=0.5)
    assert model.aux[0].weight.shape == (8, 16, 1, 1) and not model.training
