"""A ConvNeXt-class network in plain torch for the latency benchmark (random weights).

ConvNeXt (Liu et al. 2022): a 4x4 stride-4 stem, four stages of blocks ``depthwise 7x7
conv -> LayerNorm -> Linear(4C) -> GELU -> Linear(C) -> layer scale -> + residual``
(channels last inside the MLP), LayerNorm + 2x2 stride-2 conv between stages. The default
sizes are timm's ``convnext_nano`` (dims 80-640, depths 2-2-8-2, 15.6 M params, 2.5 GMACs
at 224x224). The LayerNorms normalise over the residual stream's channels, so exact
shrinking removes only the MLP hidden neurons.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelsFirstNorm(nn.LayerNorm):
    """LayerNorm over the channels of an ``(N, C, H, W)`` tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act = nn.Linear(dim, 4 * dim), nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # layer scale: timm starts it at 1e-6; 0.1 keeps the MLP visible at random init
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.act(self.pwconv1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(
        self,
        dims: tuple[int, ...] = (80, 160, 320, 640),
        depths: tuple[int, ...] = (2, 2, 8, 2),
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4), ChannelsFirstNorm(dims[0])]
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            if i:
                layers += [ChannelsFirstNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)]
            layers += [ConvNeXtBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm, self.head = nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.features(x).mean((2, 3))))
