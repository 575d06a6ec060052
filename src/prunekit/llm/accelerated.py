"""Models dispatched by accelerate with offloaded blocks, pruned in place one block at a time.

``from_pretrained(..., device_map=..., offload_folder=...)`` (or ``accelerate``'s
``disk_offload`` / ``cpu_offload``) leaves an offloaded module's tensors on the meta device;
its hook holds where their values live (``weights_map``: the checkpoint's safetensors,
``<name>.dat`` files in the offload folder, or a CPU dict) and loads them onto its
execution device for each forward, dropping them after.

:class:`OffloadedBlocks` is the :class:`~prunekit.llm.engine.BlockStream` for such a
model. Before the walk reaches a block it loads the block's tensors once, checks its
layers' weights (:func:`~prunekit.layers.check_weight`: NaN, dtype) and turns its hooks'
per-forward loading off, so the statistics pass, the pruning and the output pass share one
copy. When the block is done (baked), each pruned weight is *staged* (a ``.dat`` file in
a staging folder inside the offload folder, in accelerate's format, or a CPU tensor for a
dict), the block's tensors go back to the meta device and its hooks are restored.
:meth:`OffloadedBlocks.commit` moves every staged weight into place and points the
hooks' index at it; :meth:`OffloadedBlocks.rollback` (any error) deletes the staging and
puts every loaded block back: the model is then exactly as it was.

Memory: one block's tensors beyond what accelerate keeps resident. The checkpoint the
model was loaded from is never written; ``model.save_pretrained`` writes the pruned model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from prunekit.errors import IncompatibleLayerError, UnsupportedModelError
from prunekit.layers import check_weight
from prunekit.llm.blocks import block_layers
from prunekit.llm.engine import BlockInputs
from prunekit.llm.placement import offloading_hooks


def check_offloaded(keep_masks: bool, allocation: str) -> None:
    """What an offloaded model cannot do: masks kept (accelerate stores plain tensors) and
    OWL (its statistics pass would load every block a second time)."""
    if keep_masks:
        raise IncompatibleLayerError(
            "keep_masks=True: the model's blocks are offloaded by accelerate, which stores "
            "plain tensors, so the masks could not be kept; Fix: keep_masks=False (the zeros "
            "are baked), or load the model without offloading."
        )
    if allocation != "uniform":
        raise IncompatibleLayerError(
            f"allocation={allocation!r}: the model's blocks are offloaded by accelerate and "
            "prunekit prunes such a model in one pass; Fix: allocation='uniform', or load "
            "the model without offloading."
        )


def _names(sub: nn.Module, hook: Any) -> list[str]:
    """The tensors of ``sub`` (its own, not its children's) that ``hook`` offloads."""
    names = [n for n, _ in sub.named_parameters(recurse=False)]
    if getattr(hook, "offload_buffers", False):
        names += [n for n, _ in sub.named_buffers(recurse=False)]
    return names


def _set(sub: nn.Module, name: str, device: Any, value: Tensor | None = None) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(sub, name, device, value=value)


class OffloadedBlocks:
    """The block stream of an accelerate-offloaded model (module docstring)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.loaded: list[tuple[nn.Module, Any]] = []
        self.staged: list[tuple[Any, str, Tensor | Path, dict[str, Any]]] = []
        self.folders: dict[str, Path] = {}

    def load(self, index: int, block: nn.Module) -> None:
        for sub, hook in offloading_hooks(block):
            self.loaded.append((sub, hook))
            for name in _names(sub, hook):
                _set(sub, name, hook.execution_device, hook.weights_map[name])
            hook.offload = False
        for layer in block_layers(block, f"{self.prefix}.{index}"):
            check_weight(layer)

    def done(
        self, index: int, block: nn.Module, errors: dict[str, float], inputs: BlockInputs
    ) -> None:
        pruned = {id(ly.module) for ly in block_layers(block, "")}
        mine = {id(m) for m in block.modules()}
        for sub, hook in [(s, h) for s, h in self.loaded if id(s) in mine]:
            if id(sub) in pruned:
                self._stage(hook.weights_map, sub.weight.detach())
            _unload(sub, hook)
        self.loaded = [(s, h) for s, h in self.loaded if id(s) not in mine]

    def _stage(self, weights_map: Any, weight: Tensor) -> None:
        """``weight`` (the pruned ``weight`` of the module ``weights_map`` serves) kept
        aside until :meth:`commit`: a CPU copy for an in-memory map, else a ``.dat``."""
        dataset, key = getattr(weights_map, "dataset", None), getattr(weights_map, "prefix", "")
        key += "weight"
        info = {"dtype": str(weight.dtype).removeprefix("torch."), "shape": list(weight.shape)}
        folder = getattr(dataset, "save_folder", None)
        if isinstance(dataset, dict) or key in getattr(dataset, "state_dict", {}):
            self.staged.append((dataset, key, weight.to("cpu", copy=True), info))
            return
        if folder is None or not hasattr(dataset, "index"):
            raise UnsupportedModelError(
                f"{key}: accelerate keeps it in a {type(dataset).__name__}, which prunekit "
                "cannot write back; Fix: load the model with an offload_folder, or prune its "
                "checkpoint out of core (pk.llm.prune_checkpoint)."
            )
        from accelerate.utils import offload_weight

        staging = self.folders.get(folder) or Path(tempfile.mkdtemp(".prunekit", dir=folder))
        self.folders[folder] = staging
        offload_weight(weight.cpu(), key, str(staging), index={})
        self.staged.append((dataset, key, staging / f"{key}.dat", info))

    def commit(self) -> None:
        """Every staged weight moved into place, the hooks' index pointing at it."""
        self._unload_all()
        for dataset, key, value, info in self.staged:
            if isinstance(value, Tensor):
                (dataset if isinstance(dataset, dict) else dataset.state_dict)[key] = value
                continue
            os.replace(value, Path(dataset.save_folder) / value.name)
            dataset.index[key] = info
        self._clean()

    def rollback(self) -> None:
        """Staged weights deleted, every loaded block back on meta: the model as it was."""
        self._unload_all()
        self._clean()

    def _unload_all(self) -> None:
        for sub, hook in self.loaded:
            _unload(sub, hook)
        self.loaded = []

    def _clean(self) -> None:
        for staging in self.folders.values():
            shutil.rmtree(staging, ignore_errors=True)
        self.staged, self.folders = [], {}


def _unload(sub: nn.Module, hook: Any) -> None:
    """``sub``'s offloaded tensors back on the meta device, its hook loading them again."""
    for name in _names(sub, hook):
        if not getattr(sub, name).is_meta:
            _set(sub, name, "meta")
    hook.offload = True
