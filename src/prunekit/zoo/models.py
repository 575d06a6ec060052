"""Small reference models covering every layer type prunekit handles.

Each model is a plain ``nn.Module`` sized for 28x28 single-channel images (MNIST) or short
token sequences, so that pruning experiments run in seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import UnknownChoiceError


class LeNet300100(nn.Module):
    """MLP 784 -> 300 -> 100 -> 10 with ReLU (LeCun et al. 1998).

    Input ``(B, 784)`` or ``(B, 1, 28, 28)`` (flattened inside); output ``(B, num_classes)``.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """conv5x5(6) -> pool -> conv5x5(16) -> pool -> 256 -> 120 -> 84 -> 10, ReLU.

    Input ``(B, C, 28, 28)`` or ``(B, C*784)`` (reshaped inside); output ``(B, num_classes)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.view(-1, self.in_channels, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class SmallVGG(nn.Module):
    """VGG-style: per width, conv3x3-BN-ReLU then maxpool 2; global average pool; linear.

    Input ``(B, C, H, W)`` with H, W >= 2**len(widths); output ``(B, num_classes)``.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip((in_channels, *widths[:-1]), widths, strict=True):
            layers += [*_conv_bn(c_in, c_out, 3), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """ResNet basic block: two conv3x3-BN, residual add (1x1 conv-BN shortcut on a shape change)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, 3, stride)
        self.conv2, self.bn2 = _conv_bn(c_out, c_out, 3)
        self.shortcut = (
            nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet (He et al. 2016): stem conv3x3-BN-ReLU, 3 stages of BasicBlocks
    with widths (w, 2w, 4w) and strides (1, 2, 2), global average pool, linear.

    ``blocks_per_stage=3`` gives ResNet-20. Input ``(B, C, H, W)``; output ``(B, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        blocks_per_stage: int = 3,
    ) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, width, 3)
        blocks: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6, depthwise 3x3-BN-ReLU6, 1x1 project-BN,
    residual add when the stride is 1 and the channel count is unchanged."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.block = nn.Sequential(
            *_conv_bn(c_in, hidden, 1), nn.ReLU6(),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(),
            *_conv_bn(hidden, c_out, 1),
        )  # fmt: skip
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2Small(nn.Module):
    """Small MobileNetV2 (Sandler et al. 2018): stem conv3x3(16)-BN-ReLU6, five inverted
    residual blocks (widths 16-24-24-32-32, two stride-2), 1x1 conv(128)-BN-ReLU6,
    global average pool, linear.

    Input ``(B, C, H, W)``; output ``(B, num_classes)``.
    """

    # (expand ratio, output channels, stride)
    config = ((2, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1))

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(in_channels, 16, 3), nn.ReLU6()]
        c_in = 16
        for expand, c_out, stride in self.config:
            layers.append(InvertedResidual(c_in, c_out, stride, expand))
            c_in = c_out
        layers += [*_conv_bn(c_in, 128, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (optionally causal).

    Shapes follow the projections (``heads`` is inferred), so removing whole heads from
    q/k/v/out (``pk.shrink``) leaves a model that still runs.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.head_dim, self.causal = dim // heads, causal
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (
            proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """Transformer feed-forward: fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, causal: bool = False) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    """Vision transformer (Dosovitskiy et al. 2021): conv patch embedding (stride = patch),
    cls token, learned positional embedding, ``depth`` pre-norm blocks, LayerNorm, linear head
    on the cls token.

    Input ``(B, C, image_size, image_size)``; output ``(B, num_classes)``.
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 7,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
    ) -> None:
        super().__init__()
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n_patches + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, n_patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.ln(self.blocks(x))[:, 0])


class TinyGPT(nn.Module):
    """GPT-style decoder (nanoGPT): token + positional embeddings, ``depth`` pre-norm causal
    blocks (MLP width 4*dim), final LayerNorm, linear lm_head.

    Input ``(B, T)`` int64 token ids with T <= block_size; output logits ``(B, T, vocab_size)``.
    """

    def __init__(
        self,
        vocab_size: int = 128,
        block_size: int = 64,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(block_size, dim)
        self.blocks = nn.Sequential(
            *(Block(dim, heads, 4 * dim, causal=True) for _ in range(depth))
        )
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        seq_len = idx.shape[1]
        if seq_len > self.block_size:
            raise ValueError(f"sequence length {seq_len} exceeds block_size {self.block_size}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(seq_len, device=idx.device))
        return self.lm_head(self.ln_f(self.blocks(x)))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300100,
    "lenet5": LeNet5,
    "vgg": SmallVGG,
    "resnet20": ResNet20,
    "mobilenetv2": MobileNetV2Small,
    "vit": TinyViT,
    "gpt": TinyGPT,
}


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build the registry model ``name`` (a key of ``MODELS``) with constructor ``kwargs``."""
    if name not in MODELS:
        raise UnknownChoiceError("model", name, sorted(MODELS))
    return MODELS[name](**kwargs)


def example_input(model_name: str, batch_size: int = 1) -> Tensor:
    """A valid input for registry model ``model_name`` built with default arguments:
    ``(B, 1, 28, 28)`` float images, or ``(B, 16)`` int64 tokens for ``"gpt"`` (fixed seed)."""
    if model_name not in MODELS:
        raise UnknownChoiceError("model", model_name, sorted(MODELS))
    gen = torch.Generator().manual_seed(0)
    if model_name == "gpt":
        return torch.randint(0, 128, (batch_size, 16), generator=gen)
    return torch.randn(batch_size, 1, 28, 28, generator=gen)


def torchvision_init(model: nn.Module) -> nn.Module:
    """Draw ``model``'s weights as torchvision initialises its ResNet and MobileNetV2:
    convs ``N(0, 2 / fan_out)`` (Kaiming, fan-out mode) with bias 0, BatchNorm weight 1 /
    bias 0, linear layers ``N(0, 0.01^2)`` with bias 0. PyTorch's default layer init
    shrinks the signal about 3x per layer, so a deep random CNN's output stops depending
    on its input; this one keeps it (outputs still small at init). Returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
