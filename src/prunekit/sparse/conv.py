"""Sparse Conv2d by im2col: ``unfold`` the input, one sparse GEMM, fold the result.

For ``groups=1`` and zero padding, ``conv2d(x, W)`` equals, per image,
``W.reshape(out, -1) @ unfold(x)`` (Chellapilla et al. 2006). A 1x1 convolution with
stride 1 and no padding needs no unfold: it is the GEMM on ``x`` viewed as
``(in, images * pixels)``. The GEMM columns run input-major (unfold's order) or, for N:M,
kernel-major (see :mod:`prunekit.sparse.gemm`); the unfolded rows are reordered to match.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from prunekit.sparse.base import SparseLinear


class SparseConv2d(nn.Module):
    """A Conv2d (``groups=1``, zero padding) computed by a :class:`SparseLinear` GEMM."""

    def __init__(self, conv: dict[str, Any], gemm: SparseLinear, bias: Tensor | None) -> None:
        super().__init__()
        self.in_channels: int = conv["in_channels"]
        self.out_channels: int = conv["out_channels"]
        self.kernel_size: tuple[int, int] = tuple(conv["kernel_size"])  # type: ignore[assignment]
        self.stride: tuple[int, int] = tuple(conv["stride"])  # type: ignore[assignment]
        self.padding: tuple[int, int] = tuple(conv["padding"])  # type: ignore[assignment]
        self.dilation: tuple[int, int] = tuple(conv["dilation"])  # type: ignore[assignment]
        self.kernel_major: bool = conv["kernel_major"]
        self.geometry = dict(conv)
        self.pointwise = (
            self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        )
        self.gemm = gemm
        self.register_buffer("bias", bias)

    @staticmethod
    def conv_spec(module: nn.Conv2d, kernel_major: bool) -> dict[str, Any]:
        """The geometry of ``module`` as JSON-able fields."""
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": list(module.padding),
            "dilation": list(module.dilation),
            "kernel_major": kernel_major,
            "bias": module.bias is not None,
        }

    def spec(self) -> dict[str, Any]:
        return {"format": "conv2d", "conv": self.geometry, "gemm": self.gemm.spec()}

    @property
    def format(self) -> str:
        return self.gemm.format

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
        )
        out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if self.pointwise:
            cols = x.transpose(0, 1).reshape(self.in_channels, n * h * w)
        else:
            unfolded = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
            if self.kernel_major:  # rows c * (kh * kw) + j  ->  j * in_channels + c
                unfolded = unfolded.view(n, self.in_channels, kh * kw, -1).transpose(1, 2)
                unfolded = unfolded.reshape(n, self.gemm.in_features, -1)
            cols = unfolded.transpose(0, 1).reshape(self.gemm.in_features, -1)
        y = self.gemm.matmul(cols)  # (out, n * pixels)
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y.view(self.out_channels, n, out_h, out_w).transpose(0, 1).contiguous()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )
