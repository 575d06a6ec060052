"""Random small networks (residuals, concats, splits, depthwise / grouped convs, flatten to
linear, BatchNorm / LayerNorm): shrinking must match the group-masked model and train."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from structured_models import assert_equivalent, assert_trains, masked_and_shrunk, randomize_norms
from torch import Tensor, nn

BLOCKS = ("conv", "residual", "concat", "split", "depthwise", "grouped", "layernorm", "se")


class Block(nn.Module):
    """One block of kind ``kind`` from ``c`` channels; ``self.out`` channels come out."""

    def __init__(self, kind: str, c: int, width: int) -> None:
        super().__init__()
        self.kind = kind
        self.out = c
        if kind == "conv":
            self.a, self.bn = nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width)
            self.out = width
        elif kind == "residual":
            self.a, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        elif kind == "concat":
            self.a, self.b = nn.Conv2d(c, width, 1), nn.Conv2d(c, width + 1, 3, padding=1)
            self.out = 2 * width + 1
        elif kind == "split":
            self.a = nn.Conv2d(c // 2, c // 2, 1)
            self.out = c
        elif kind == "depthwise":
            self.a, self.bn = nn.Conv2d(c, 2 * c, 3, padding=1, groups=c), nn.BatchNorm2d(2 * c)
            self.out = 2 * c
        elif kind == "grouped":
            self.a = nn.Conv2d(c, 2 * width, 1, groups=2)
            self.out = 2 * width
        elif kind == "layernorm":
            self.ln, self.a = nn.LayerNorm(c), nn.Linear(c, width)
            self.out = width
        elif kind == "se":
            self.a, self.b = nn.Linear(c, width), nn.Linear(width, c)

    def forward(self, x: Tensor) -> Tensor:
        k = self.kind
        if k in ("conv", "depthwise"):
            return torch.relu(self.bn(self.a(x)))
        if k == "residual":
            return x + self.bn(self.a(x))
        if k == "concat":
            return torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        if k == "split":  # a GLU-like chunk, then a concat in the other order
            left, right = x.chunk(2, dim=1)
            return torch.cat([right * torch.sigmoid(left), torch.relu(self.a(left))], dim=1)
        if k == "grouped":
            return torch.relu(self.a(x))
        if k == "layernorm":
            return self.a(self.ln(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        gate = torch.sigmoid(self.b(torch.relu(self.a(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class Net(nn.Module):
    def __init__(self, kinds: list[str], width: int, flatten: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2 * width, 3, padding=1)
        blocks, c = [], 2 * width
        for kind in kinds:
            if kind in ("grouped", "split") and c % 2:
                kind = "conv"
            blocks.append(Block(kind, c, width))
            c = blocks[-1].out
        self.blocks = nn.Sequential(*blocks)
        self.flatten = flatten
        self.head = nn.Sequential(
            nn.Linear(c * 16 if flatten else c, 6), nn.ReLU(), nn.Linear(6, 3)
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.blocks(torch.relu(self.stem(x)))
        y = y.flatten(1) if self.flatten else y.mean(dim=(2, 3))
        return self.head(y)


@settings(max_examples=25, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4),
    width=st.integers(2, 6),
    flatten=st.booleans(),
    ratio=st.sampled_from([0.25, 0.5, 0.75]),
    scope=st.sampled_from(["local", "global"]),
)
def test_random_networks_shrink_exactly(
    kinds: list[str], width: int, flatten: bool, ratio: float, scope: str
) -> None:
    torch.manual_seed(0)
    model = randomize_norms(Net(kinds, width, flatten)).eval()
    x = torch.randn(2, 3, 4, 4)
    masked, small, decisions = masked_and_shrunk(model, x, ratio, scope=scope)
    assert all(d.kept >= 1 for d in decisions)
    assert_equivalent(masked, small, x)
    assert_trains(small, x)
