"""Save a converted model to safetensors and load it into a fresh instance of its
architecture: the file holds the state dict (sparse buffers as they are) and, in its
header, the spec of every sparse module so that :func:`load` can rebuild them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit import masks
from prunekit.errors import CheckpointError, PruningError
from prunekit.sparse.base import SparseLinear
from prunekit.sparse.conv import SparseConv2d
from prunekit.sparse.formats import from_spec, set_module
from prunekit.sparse.nm_linear import SemiStructuredLinear

_KEY = "prunekit.sparse"


def save(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s state dict and its sparse modules' specs to ``path``.

    Raises:
        PruningError: for a model holding ``"nm-cuda"`` modules (a CUDA-side layout); save
            the ``"nm"`` form, and convert to ``"nm-cuda"`` after loading.
    """
    cuda = [n for n, m in model.named_modules() if isinstance(m, SemiStructuredLinear)]
    if cuda:
        raise PruningError(
            f"layers {cuda} are 'nm-cuda' (2:4 semi-structured) modules, which have no "
            "portable layout; Fix: save the model converted with format='nm' and convert "
            "to 'nm-cuda' after loading."
        )
    specs = {}
    for name, module in model.named_modules():
        inside_conv = any(name.startswith(f"{conv}.") for conv in specs)
        if isinstance(module, SparseLinear | SparseConv2d) and not inside_conv:
            specs[name] = module.spec()
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={_KEY: json.dumps(specs)})


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a file written by :func:`save` into ``model`` (the dense architecture), in place:
    its layers named in the file become empty sparse modules, then every tensor loads
    strictly (masks included, via :func:`prunekit.masks.load_state_dict`). Returns ``model``.

    Raises:
        CheckpointError: the file was not written by :func:`save`, or for another
            architecture; ``model`` is left unchanged.
    """
    with safe_open(str(path), framework="pt") as f:
        header = (f.metadata() or {}).get(_KEY)
    if header is None:
        raise CheckpointError(
            f"{str(path)!r} has no {_KEY!r} header; Fix: load a file written by "
            "prunekit.sparse.save (a plain state dict loads with model.load_state_dict)."
        )
    state = load_file(str(path))
    trial = copy.deepcopy(model)  # replacing modules changes the model: try a copy first
    try:
        _load_into(trial, json.loads(header), state)
    except (KeyError, AttributeError, RuntimeError, PruningError) as err:
        raise CheckpointError(
            f"{str(path)!r} does not load into {type(model).__name__}: "
            f"{str(err).splitlines()[0]}; Fix: load it into the architecture it was saved from."
        ) from err
    _load_into(model, json.loads(header), state)
    return model


def _load_into(model: nn.Module, specs: dict, state: dict) -> None:
    for name, spec in specs.items():
        set_module(model, name, from_spec(spec))
    masks.load_state_dict(model, state)
