"""Where a model's blocks live and compute, accelerate's offloading hooks included."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def offloading_hooks(module: nn.Module) -> list[tuple[nn.Module, Any]]:
    """``(submodule, hook)`` for each submodule of ``module`` whose accelerate hook
    offloads its tensors (``offload`` on, a ``weights_map``)."""
    found = []
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
            found.append((sub, hook))
    return found


def execution_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: its first tensor not on the meta device, else the first
    offloading hook's execution device (every tensor offloaded), else the CPU."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta:
            return tensor.device
    hooks = offloading_hooks(model)
    return torch.device(hooks[0][1].execution_device) if hooks else torch.device("cpu")
