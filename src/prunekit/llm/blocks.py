"""Finding a transformer's repeated blocks and the Linear-like layers inside each one.

The blocks are the ``nn.ModuleList`` of same-class modules holding the most parameters:
``model.layers`` (Llama, Mistral, Qwen2), ``model.decoder.layers`` (OPT),
``transformer.h`` (GPT-2), ``encoder.layer`` (BERT). Embeddings and the LM head live
outside it, so they stay dense.
"""

from __future__ import annotations

from torch import nn

from prunekit.errors import UnsupportedModelError
from prunekit.layers import Layer, is_prunable, kernel_ndim, require_model


def _linear_like(module: nn.Module) -> bool:
    return is_prunable(module) and not isinstance(module, nn.Embedding) and not kernel_ndim(module)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(qualified name, blocks)``; ``path`` names the ModuleList explicitly.

    Raises:
        UnsupportedModelError: no such path, or no ModuleList of repeated blocks holding
            Linear-like layers.
        PruningError: ``model`` is not an ``nn.Module``.
    """
    require_model(model)
    if path is not None:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            blocks = None
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedModelError(
                f"blocks={path!r} is not a non-empty nn.ModuleList of {type(model).__name__}; "
                "Fix: pass the qualified name of its decoder/encoder layer list "
                "(e.g. 'model.layers')."
            )
        return path, blocks
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(child) for child in module}) == 1
        and any(_linear_like(m) for m in module[0].modules())
    ]
    if not candidates:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no nn.ModuleList of repeated blocks with Linear "
            "layers, so it cannot be pruned block by block; Fix: pass blocks='<name of the "
            "layer list>' if it has one under another container."
        )
    return max(candidates, key=lambda item: _params(item[1]))


def block_layers(block: nn.Module, prefix: str) -> list[Layer]:
    """The Linear / transformers Conv1D layers of ``block``, named ``prefix.<name>``."""
    return [
        Layer(f"{prefix}.{name}", module)
        for name, module in block.named_modules()
        if _linear_like(module)
    ]
