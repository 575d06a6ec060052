"""Masks in a shrunk save: a model that kept its masks through :func:`pk.shrink
<prunekit.structured.shrink.shrink>` saves and loads them with
:func:`~prunekit.structured.io.save_shrunk` / :func:`~prunekit.structured.io.load_shrunk`.

The weights file holds the masked weights (zeros written in, as :func:`pk.bake
<prunekit.masks.bake>` leaves them), so ``from_pretrained`` and any other reader get the
function the model computes; each mask goes to ``masks.safetensors`` under its weight's
name, one byte (0 or 1) per weight, and the layout lists them (``"masks": {name: shape}``);
the digest covers both files. Loading checks that every mask names a weight of the model,
has that weight's shape in the layout and holds only 0 and 1, before anything changes; the
masks are registered once the weights are in.
"""

from __future__ import annotations

import copy
from pathlib import Path
from reprlib import repr as brief
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prunekit.errors import CheckpointError, ShrunkLayoutError
from prunekit.masks import bake, get_mask, mask_param
from prunekit.structured import carry
from prunekit.structured.graph import owner

MASKS = "masks.safetensors"
Problem = tuple[type[CheckpointError | ShrunkLayoutError], str]


def split(model: nn.Module) -> tuple[nn.Module, dict[str, Tensor]]:
    """``model`` without prunekit masks (a baked copy; ``model`` itself when it has none),
    and its masks by weight name (one per tensor: tied holders share it)."""
    masks = {
        f"{name}.weight" if name else "weight": get_mask(module)
        for name, module in model.named_modules()
        if mask_param(module) is not None
    }
    if not masks:
        return model, {}
    plain = bake(copy.deepcopy(model))
    names = dict(plain.named_parameters())  # the first name of each tensor
    return plain, {n: m for n, m in masks.items() if n in names}


def write(file: Path, masks: dict[str, Tensor]) -> dict[str, list[int]]:
    """Write ``masks`` (0 / 1 bytes) to ``file``; returns the layout's ``"masks"``."""
    save_file({n: m.to(torch.uint8).contiguous().cpu() for n, m in masks.items()}, str(file))
    return {n: list(m.shape) for n, m in masks.items()}


def problems(listed: dict[str, Any], model: nn.Module, shapes: dict[str, Any]) -> list[Problem]:
    """What is wrong with the layout's ``"masks"`` for ``model`` (``shapes``: the layout's)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out: list[Problem] = []
    for name, shape in listed.items():
        where = f"masks[{brief(name)}]"
        if not name.endswith("weight") or name not in params:
            out.append((ShrunkLayoutError, f"{where}: the model has no such weight"))
            continue
        want = shapes.get(name, list(params[name].shape))
        if shape != want:
            out.append((CheckpointError, f"{where} = {brief(shape)}, but the weight is {want}"))
    return out


def read(file: Path, listed: dict[str, list[int]]) -> dict[str, Tensor]:
    """The masks of ``file`` (bool), exactly those ``listed`` with their shapes, 0 / 1 only."""
    try:
        stored = load_file(str(file))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot read {str(file)!r} ({err})") from err
    bad = sorted(set(stored) ^ set(listed)) or [
        n
        for n, m in stored.items()
        if m.dtype != torch.uint8 or list(m.shape) != listed[n] or bool((m > 1).any())
    ]
    if bad:
        raise CheckpointError(
            f"{str(file)!r} does not hold the masks its layout lists ({brief(bad[0])}: missing, "
            "unlisted, of another shape, or not 0 / 1 bytes); Fix: pass a directory written "
            "by pk.save_shrunk."
        )
    return {n: m.bool() for n, m in stored.items()}


def register(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Register the loaded ``masks`` on their weights' modules (tied holders share them)."""
    carry.register(model, {owner(name): mask for name, mask in masks.items()})
