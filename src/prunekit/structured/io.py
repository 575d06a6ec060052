"""Save a shrunk model and load it into its own class, without replaying the pruning.

``save_shrunk(model, directory)`` writes ``model.safetensors`` (tied weights stored once)
and ``shrunk.json``: every tensor's shape and every module's size attributes
(``in_features``, ``num_heads``...). ``load_shrunk(fresh_model, directory)`` resizes a
freshly built model of the same class to those shapes and attributes, then loads the
weights: no pickle is ever read. A transformers model is also written with
``save_pretrained`` when its updated config rebuilds the shrunk shapes, so
``from_pretrained`` works too (``save_shrunk`` says whether it does).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from prunekit.errors import ShrunkLayoutError
from prunekit.structured.surgery import assign, size_attributes

WEIGHTS, LAYOUT = "model.safetensors", "shrunk.json"


def _layout(model: nn.Module) -> dict[str, object]:
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    attributes = {name: size_attributes(m) for name, m in model.named_modules()}
    return {
        "format": "prunekit-shrunk/1",
        "shapes": {name: list(t.shape) for name, t in tensors.items()},
        "attributes": {name: attrs for name, attrs in attributes.items() if attrs},
    }


def config_rebuilds(model: nn.Module) -> bool:
    """Whether ``type(model)(model.config)`` has exactly the shrunk model's tensor shapes."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config"):
        return False
    with torch.device("meta"):
        skeleton = type(model)._from_config(config)
    want = {n: t.shape for n, t in model.state_dict().items()}
    return {n: t.shape for n, t in skeleton.state_dict().items()} == want


def save_shrunk(model: nn.Module, directory: str | Path) -> bool:
    """Write ``model`` to ``directory``; returns whether ``from_pretrained`` can also load it."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / WEIGHTS))
    (path / LAYOUT).write_text(json.dumps(_layout(model), indent=1))
    if config_rebuilds(model):
        model.save_pretrained(path)  # type: ignore[operator]
        return True
    return False


def load_shrunk(model: nn.Module, directory: str | Path) -> nn.Module:
    """Resize ``model`` (a fresh instance of the saved model's class) and load the weights."""
    path = Path(directory)
    layout = json.loads((path / LAYOUT).read_text())
    modules = dict(model.named_modules())
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    missing = sorted(set(layout["shapes"]) - set(tensors))
    if missing:
        raise ShrunkLayoutError(
            f"{path / LAYOUT} names tensors {missing[:3]} that {type(model).__name__} does not "
            "have; Fix: load into a fresh instance of the class that was shrunk."
        )
    aliases: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False)]:  # fmt: skip
        aliases.setdefault(id(t), []).append(name)
    for name, shape in layout["shapes"].items():
        old = tensors[name]
        if list(old.shape) != shape:
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            assign(model, aliases[id(old)], new, old)
    for name, attrs in layout["attributes"].items():
        for attr, value in attrs.items():
            setattr(modules[name], attr, value)
    load_model(model, str(path / WEIGHTS))
    return model
