"""Sparse Conv2d by im2col: ``unfold`` the input, one sparse GEMM, fold the result.

For ``groups=1`` and zero padding, ``conv2d(x, W)`` equals, per image,
``W.reshape(out, -1) @ unfold(x)`` (Chellapilla et al. 2006). A 1x1 convolution with
stride 1 and no padding needs no unfold: it is the GEMM on ``x`` viewed as
``(in, images * pixels)``. The GEMM columns run input-major (unfold's order) or, for N:M,
kernel-major (see :mod:`prunekit.sparse.gemm`); the unfolded rows are reordered to match.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn import functional as F

from prunekit.errors import CheckpointError
from prunekit.sparse.base import (
    FLAG,
    PAIR,
    SIZE,
    TEXT,
    Check,
    SparseLinear,
    check_fields,
    check_tensor,
    is_pair,
)

_OBJECT: Check = (lambda v: isinstance(v, dict), "a JSON object")


class SparseConv2d(nn.Module):
    """A Conv2d (``groups=1``, zero padding) computed by a :class:`SparseLinear` GEMM."""

    SPEC_FIELDS: ClassVar[dict[str, Check]] = {"format": TEXT, "conv": _OBJECT, "gemm": _OBJECT}
    CONV_FIELDS: ClassVar[dict[str, Check]] = {
        "in_channels": SIZE, "out_channels": SIZE, "kernel_size": PAIR, "stride": PAIR,
        "padding": (lambda v: is_pair(v, low=0), "a list of two ints >= 0"),
        "dilation": PAIR, "kernel_major": FLAG, "bias": FLAG,
    }  # fmt: skip

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

    @classmethod
    def check_spec(cls, spec: object) -> dict[str, Any]:
        """``spec`` if :meth:`spec` could have written it around its (already checked)
        ``gemm`` spec: the geometry's fields, and a bias-free GEMM of ``out_channels`` rows
        and ``in_channels * kh * kw`` columns.

        Raises:
            CheckpointError: naming the field and the value.
        """
        fields = check_fields(spec, cls.SPEC_FIELDS)
        conv, gemm = check_fields(fields["conv"], cls.CONV_FIELDS), fields["gemm"]
        kh, kw = conv["kernel_size"]
        want = (conv["out_channels"], conv["in_channels"] * kh * kw, False)
        if (gemm["out_features"], gemm["in_features"], gemm["bias"]) != want:
            raise CheckpointError(
                f"spec gemm {gemm['out_features']}x{gemm['in_features']} (bias "
                f"{gemm['bias']}) is not the {want[0]}x{want[1]} bias-free GEMM of the conv"
            )
        return fields

    def check_state(self, state: Mapping[str, Tensor]) -> None:
        """The bias (``out_channels`` values of the GEMM's dtype) and the GEMM's tensors."""
        if self.bias is not None:
            check_tensor(state, "bias", self.gemm.dtype, (self.out_channels,))
        self.gemm.check_state({k[5:]: v for k, v in state.items() if k.startswith("gemm.")})

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
