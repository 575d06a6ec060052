"""One bit per weight: packing boolean masks into uint8 and back.

Masks are stored packed (8 weights per byte, most significant bit first, like
``numpy.packbits``) so that a pruned model carries 1/32 of its fp32 weight bytes in
masks instead of 1/4 (bool) or 1/1 (``torch.nn.utils.prune``'s float masks). torch has
no packbits, hence these few lines.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_BITS = (128, 64, 32, 16, 8, 4, 2, 1)


def _bit_values(device: torch.device) -> Tensor:
    return torch.tensor(_BITS, dtype=torch.uint8, device=device)


def pack(mask: Tensor) -> Tensor:
    """Pack a bool tensor (any shape) into ``ceil(numel / 8)`` uint8, row-major order."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":  # numpy's C packbits is ~10x faster than the torch ops below
        return torch.from_numpy(np.packbits(flat.numpy()))
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8).to(torch.uint8)
    return (groups * _bit_values(mask.device)).sum(1, dtype=torch.uint8)


def unpack(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack`: a bool tensor of ``shape``."""
    numel = 1
    for s in shape:
        numel *= s
    bits = torch.bitwise_and(packed.unsqueeze(-1), _bit_values(packed.device)).ne(0)
    return bits.view(-1)[:numel].view(shape)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def count_ones(packed: Tensor) -> int:
    """Number of set bits (kept weights) in a packed mask."""
    counts = torch.bincount(packed.reshape(-1).to(torch.int64), minlength=256).cpu()
    return int((counts * _POPCOUNT).sum())


def clear(packed: Tensor, positions: Tensor) -> None:
    """Clear the bits at flat ``positions`` (distinct) in place."""
    if positions.numel() == 0:
        return
    positions = positions.to(torch.int64)
    bit = torch.tensor(1, dtype=torch.int32, device=packed.device) << (7 - positions % 8).int()
    # Distinct positions set distinct bits, so a sum per byte equals their bitwise OR.
    per_byte = torch.zeros(packed.numel(), dtype=torch.int32, device=packed.device)
    per_byte.index_add_(0, positions // 8, bit)
    packed.bitwise_and_(per_byte.bitwise_not_().to(torch.uint8))
