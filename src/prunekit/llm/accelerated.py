"""Models dispatched by accelerate with offloaded blocks, pruned in place one block at a time.

``from_pretrained(..., device_map=..., offload_folder=...)`` (or ``accelerate``'s
``disk_offload`` / ``cpu_offload``) leaves an offloaded module's tensors on the meta device;
its hook holds where their values live (``weights_map``: the checkpoint's safetensors,
``<name>.dat`` files in the offload folder, or a CPU dict) and loads them onto its
execution device for each forward, dropping them after.

:func:`check_offloaded_values` runs an in-memory prune's checks on the offloaded layer
weights and fused expert tensors (:func:`~prunekit.layers.check_weight`,
:func:`~prunekit.llm.moe.check_experts`: NaN, dtype...) before the walk, so nothing is
pruned (resident blocks included) when one fails. :class:`OffloadedBlocks` is the
:class:`~prunekit.llm.engine.BlockStream` for such a model. Before the walk reaches a block
it loads the block's tensors once and turns its hooks' per-forward loading off, so the
statistics pass, the pruning and the output pass share one copy. When the block is done
(baked), each pruned weight is *staged* (a ``.dat`` file in a staging folder inside the
offload folder, in accelerate's format, or a CPU tensor for a dict), the block's tensors
go back to the meta device and its hooks are restored.
:meth:`OffloadedBlocks.commit` moves every staged weight into place and points the
hooks' index at it; :meth:`OffloadedBlocks.rollback` (any error) deletes the staging and
puts every loaded block back: the model is then exactly as it was.

Memory: one block's tensors beyond what accelerate keeps resident. The checkpoint the
model was loaded from is never written; ``model.save_pretrained`` writes the pruned model.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from prunekit.errors import IncompatibleLayerError, UnsupportedModelError
from prunekit.layers import Layer, check_weight
from prunekit.llm.blocks import block_layers
from prunekit.llm.engine import BlockInputs
from prunekit.llm.experts import PARAMS, FusedExperts, find_experts
from prunekit.llm.methods import Target
from prunekit.llm.moe import check_experts
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
    """The tensors ``hook`` offloads for ``sub``: its own, and its children's when the hook
    places submodules (``preload_module_classes``); dotted names, as ``weights_map`` keys."""
    deep = bool(getattr(hook, "place_submodules", False))
    names = [n for n, _ in sub.named_parameters(recurse=deep)]
    if getattr(hook, "offload_buffers", False):
        names += [n for n, _ in sub.named_buffers(recurse=deep)]
    return names


def _tensor(sub: nn.Module, name: str) -> Tensor:
    try:
        return sub.get_parameter(name)
    except AttributeError:
        return sub.get_buffer(name)


def _set(sub: nn.Module, name: str, device: Any, value: Tensor | None = None) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(sub, name, device, value=value)


def _in_memory(dataset: Any, key: str) -> bool:
    """Whether accelerate holds ``key`` as a tensor in memory (a dict, or the loader's
    ``state_dict``) rather than in a file."""
    return isinstance(dataset, dict) or key in getattr(dataset, "state_dict", {})


def _where(weights_map: Any, name: str) -> tuple[Any, str]:
    """The mapping behind a hook's ``weights_map`` and the full key of ``name`` in it."""
    return getattr(weights_map, "dataset", weights_map), getattr(weights_map, "prefix", "") + name


def check_offloaded_values(blocks: nn.ModuleList, prefix: str, target: Target) -> None:
    """The checks of an in-memory prune on every offloaded (meta) layer weight and fused
    expert tensor of ``blocks``: each module's values are read from its hook's
    ``weights_map`` (one module's at a time) into a stand-in, as the walk would load them;
    the model is not touched. A tensor no hook holds stays on meta, and is refused so."""
    for index, block in enumerate(blocks):
        name, stored = f"{prefix}.{index}", _stored(block)
        for layer in block_layers(block, name):
            if layer.weight.is_meta:
                check_weight(Layer(layer.name, _stand_in(layer.module, ("weight",), stored)))
        for ex in find_experts(block, name):
            if any(getattr(ex.module, p).is_meta for p in PARAMS):
                check_experts(FusedExperts(ex.name, _stand_in(ex.module, PARAMS, stored)), target)


def _stored(block: nn.Module) -> dict[int, tuple[Any, str]]:
    """``id(tensor) -> (weights_map, name)`` for each offloaded tensor of ``block``."""
    return {
        id(_tensor(sub, name)): (hook.weights_map, name)
        for sub, hook in offloading_hooks(block)
        for name in _names(sub, hook)
    }


def _stand_in(
    module: nn.Module, names: tuple[str, ...], stored: dict[int, tuple[Any, str]]
) -> nn.Module:
    """A shallow copy of ``module`` whose meta parameters ``names`` hold their stored
    values, in their dtype (as accelerate loads them); ``module`` itself is unchanged."""
    params = dict(module._parameters)
    for name in names:
        meta = params.get(name)
        if meta is not None and meta.is_meta and id(meta) in stored:
            weights_map, key = stored[id(meta)]
            params[name] = nn.Parameter(weights_map[key].to(meta.dtype), requires_grad=False)
    view = copy.copy(module)
    view.__dict__["_parameters"] = params
    return view


class OffloadedBlocks:
    """The block stream of an accelerate-offloaded model (module docstring)."""

    def __init__(self) -> None:
        self.loaded: list[tuple[nn.Module, Any]] = []
        self.staged: list[tuple[Any, str, Tensor | Path, dict[str, Any]]] = []
        self.folders: dict[str, Path] = {}

    def load(self, index: int, block: nn.Module) -> None:
        for sub, hook in offloading_hooks(block):
            self.loaded.append((sub, hook))
            for name in _names(sub, hook):
                value = hook.weights_map[name]
                if _in_memory(*_where(hook.weights_map, name)):
                    value = value.clone()  # a parameter must not alias accelerate's copy
                _set(sub, name, hook.execution_device, value)
            hook.offload = False

    def done(
        self, index: int, block: nn.Module, errors: dict[str, float], inputs: BlockInputs
    ) -> None:
        """Stage every tensor of the block's offloaded modules (layers, fused experts...:
        whatever pruning changed), then put them back on the meta device."""
        mine = {id(m) for m in block.modules()}
        for sub, hook in [(s, h) for s, h in self.loaded if id(s) in mine]:
            for name in _names(sub, hook):
                self._stage(hook.weights_map, name, _tensor(sub, name).detach())
            _unload(sub, hook)
        self.loaded = [(s, h) for s, h in self.loaded if id(s) not in mine]

    def _stage(self, weights_map: Any, name: str, tensor: Tensor) -> None:
        """``tensor`` kept aside until :meth:`commit`: a CPU copy for an in-memory map,
        else a ``.dat`` file in accelerate's format in a staging folder."""
        dataset, key = _where(weights_map, name)
        if _in_memory(dataset, key):
            self.staged.append((dataset, key, tensor.to("cpu", copy=True), {}))
            return
        folder = getattr(dataset, "save_folder", None)
        if folder is None or not hasattr(dataset, "index"):
            raise UnsupportedModelError(
                f"{key}: accelerate keeps it in a {type(dataset).__name__}, which prunekit "
                "cannot write back; Fix: load the model with an offload_folder, or prune its "
                "checkpoint out of core (pk.llm.prune_checkpoint)."
            )
        from accelerate.utils import offload_weight

        staging = self.folders.get(folder) or Path(tempfile.mkdtemp(".prunekit", dir=folder))
        self.folders[folder] = staging
        index = offload_weight(tensor.cpu(), key, str(staging), index={})  # its own entry
        self.staged.append((dataset, key, staging / f"{key}.dat", index[key]))

    def commit(self) -> None:
        """Every staged tensor moved into place and the hooks' index pointed at it; an
        error or interruption on the way undoes the moves made (old files were kept
        aside), so the model is either all pruned or as it was. No staging is left."""
        self._unload_all()
        undo: list[Callable[[], object]] = []
        try:
            for dataset, key, value, info in self.staged:
                if isinstance(value, Tensor):
                    _replace_entry(dataset if isinstance(dataset, dict) else dataset.state_dict,
                                   key, value, undo)  # fmt: skip
                else:
                    _replace_file(dataset, key, value, info, undo)
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        finally:
            self._clean()

    def rollback(self) -> None:
        """Staged tensors deleted, every loaded block back on meta: the model as it was."""
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


def _replace_entry(
    target: dict[str, Any], key: str, value: Tensor, undo: list[Callable[[], object]]
) -> None:
    old = target.get(key)
    undo.append(lambda: target.__setitem__(key, old) if old is not None else target.pop(key))
    target[key] = value


def _replace_file(
    dataset: Any, key: str, staged: Path, info: dict[str, Any], undo: list[Callable[[], object]]
) -> None:
    """``staged`` moved over ``<offload folder>/<key>.dat`` (the old file, if any, kept in
    the staging folder until the commit ends) and the index entry of ``key`` replaced;
    each step's inverse appended to ``undo`` before the step runs."""
    dest, backup = Path(dataset.save_folder) / staged.name, staged.with_suffix(".old")
    if dest.exists():  # each move is atomic: undone only if it happened
        undo.append(lambda: os.replace(backup, dest) if backup.exists() else None)
        os.replace(dest, backup)
    else:
        undo.append(lambda: dest.unlink(missing_ok=True))
    os.replace(staged, dest)
    old = dataset.index.get(key)
    undo.append(lambda: dataset.index.__setitem__(key, old))
    dataset.index[key] = info


def _unload(sub: nn.Module, hook: Any) -> None:
    """``sub``'s offloaded tensors back on the meta device, its hook loading them again."""
    for name in _names(sub, hook):
        if not _tensor(sub, name).is_meta:
            _set(sub, name, "meta")
    hook.offload = True
