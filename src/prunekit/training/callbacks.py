"""Drive a :class:`~prunekit.Pruner` from a training loop you do not write yourself.

- :class:`PruningCallback`: a transformers ``TrainerCallback`` that calls
  ``pruner.step()`` after every optimizer step of a ``transformers.Trainer``
  (transformers is imported only when the class is first used); its Trainer
  checkpoints carry the Pruner's state and masks, and resume bit-exact.
- :class:`LightningPruning`: the same for a ``lightning.Trainer`` (lightning imported
  only when the class is first used).
- :func:`train_with_pruner`: :func:`~prunekit.training.loop.fit` with the Pruner
  stepping after every optimizer step.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn

from prunekit.errors import PrunerStateError, PruningError, ScheduleError
from prunekit.fsio import atomic_write
from prunekit.masks import apply_packed, is_mask_key, mask_param
from prunekit.pruner import Pruner
from prunekit.training.data import TrainData, steps_per_epoch, training_batches
from prunekit.training.loop import fit


def _check_model(model: nn.Module | None, pruner: Pruner) -> None:
    if not isinstance(pruner, Pruner):
        raise PruningError(f"pruner={pruner!r} is not a pk.Pruner; Fix: pk.Pruner(model, ...).")
    if model is not None and model is not pruner.model:
        raise PruningError(
            f"the loop trains a {type(model).__name__} that is not the Pruner's model "
            f"({type(pruner.model).__name__}); Fix: build the Pruner on the model you train."
        )


logger = logging.getLogger(__name__)
PRUNER_FILE = "prunekit_pruner.safetensors"
"""The Pruner's state and masks in a Trainer checkpoint folder (:class:`PruningCallback`)."""


def _saved(args: Any, state: Any) -> Path:
    """Where the Trainer's checkpoint of ``state.global_step`` keeps the Pruner's file."""
    return Path(args.output_dir) / f"checkpoint-{state.global_step}" / PRUNER_FILE


def _save(pruner: Pruner, path: Path) -> None:
    """The Pruner's :meth:`~prunekit.Pruner.state_dict` (as JSON metadata) and its model's
    packed masks, in one safetensors file, written atomically."""
    masks = {k: v.contiguous() for k, v in pruner.model.state_dict().items() if is_mask_key(k)}
    meta = {"pruner": json.dumps(pruner.state_dict())}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save_tensors(masks, metadata=meta))


def _restore(pruner: Pruner, path: Path) -> None:
    """Put back what :func:`_save` wrote at ``path`` (nothing when there is no file): the
    Pruner's state, the masks on its model, then the weights of the Trainer's checkpoint
    beside it, which the Trainer could not load into the still unmasked model."""
    if not path.is_file():
        return
    with safe_open(str(path), "pt") as f:
        state = json.loads(f.metadata()["pruner"])
        masks = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    pruner.load_state_dict(state)
    _register_masks(pruner.model, masks)
    for shard in sorted(path.parent.glob("model*.safetensors")):
        pruner.model.load_state_dict(load_file(shard), strict=False)  # tied weights: absent
    logger.info("resuming the Pruner at step %d from %s", pruner.step_count, path)


@functools.cache
def _callback_class() -> type:
    from transformers import TrainerCallback

    class PruningCallback(TrainerCallback):
        """Steps ``pruner`` after every optimizer step of a ``transformers.Trainer``.

        ``Trainer(model, args, ..., callbacks=[PruningCallback(pk.Pruner(model, ...))])``.
        Every Trainer checkpoint gets the Pruner's :meth:`~prunekit.Pruner.state_dict`
        and masks in :data:`PRUNER_FILE` (written atomically, by the main process);
        ``trainer.train(resume_from_checkpoint=...)`` with a fresh model and Pruner puts
        them back, with the checkpoint's masked weights, and goes on exactly as the
        uninterrupted run. The file is looked for in
        ``args.output_dir/checkpoint-<global_step>``; resumed from elsewhere, load the
        Pruner's state yourself: training refuses to start if the Pruner's step count
        differs from the Trainer's ``global_step``.
        """

        def __init__(self, pruner: Pruner) -> None:
            _check_model(None, pruner)
            self.pruner = pruner

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _check_model(kwargs.get("model"), self.pruner)
            if state.global_step != self.pruner.step_count and getattr(args, "output_dir", None):
                _restore(self.pruner, _saved(args, state))
            if state.global_step != self.pruner.step_count:
                raise PrunerStateError(
                    f"the Trainer starts at step {state.global_step}, the Pruner at step "
                    f"{self.pruner.step_count}; Fix: pruner.load_state_dict(<the state saved "
                    "with the checkpoint>) before resuming."
                )

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.pruner.step()

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                _save(self.pruner, _saved(args, state))

    PruningCallback.__module__ = __name__
    return PruningCallback


def _register_masks(model: nn.Module, masks: dict[str, Any]) -> None:
    """Put the packed ``masks`` (state-dict keys of ``model``) on ``model``'s layers."""
    modules = dict(model.named_modules())
    for key, packed in masks.items():
        module = modules[key.rsplit(".parametrizations.weight.", 1)[0]]
        existing = mask_param(module)
        if existing is None:
            apply_packed(module, packed)
        else:
            existing.packed.copy_(packed)


def _masks_first(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """A load-state-dict pre-hook: the packed masks of ``state`` on ``module``'s layers."""
    masks = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    _register_masks(module, {k: v for k, v in masks.items() if is_mask_key(k)})


@functools.cache
def _lightning_class() -> type:
    import lightning.pytorch as pl

    class LightningPruning(pl.Callback):
        """Steps ``pruner`` after every optimizer step of a ``lightning.Trainer``
        (``Trainer(callbacks=[LightningPruning(pk.Pruner(module.model, ...))])``); the
        Pruner's state goes into Lightning checkpoints, and ``trainer.fit(...,
        ckpt_path=...)`` puts it back, the masks registered before the masked weights load.
        """

        def __init__(self, pruner: Pruner) -> None:
            _check_model(None, pruner)
            self.pruner = pruner

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if stage == "fit":  # a checkpoint's masks exist before its masked weights load
                pl_module.register_load_state_dict_pre_hook(_masks_first)

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            while self.pruner.step_count < trainer.global_step:  # optimizer steps so far
                self.pruner.step()

        def state_dict(self) -> dict[str, Any]:
            return self.pruner.state_dict()

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.pruner.load_state_dict(state_dict)

    LightningPruning.__module__ = __name__
    return LightningPruning


def __getattr__(name: str) -> Any:
    if name == "PruningCallback":
        return _callback_class()
    if name == "LightningPruning":
        return _lightning_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train_with_pruner(
    model: nn.Module,
    data: TrainData,
    pruner: Pruner,
    epochs: int,
    lr: float,
    *,
    batch_size: int = 64,
    seed: int = 0,
    **train_kwargs: Any,
) -> list[float]:
    """Train ``model`` with :func:`~prunekit.training.loop.fit`, stepping ``pruner`` after
    every optimizer step; returns the mean training loss of each epoch.

    ``data`` is a dataset in memory (batches of ``batch_size`` drawn from ``seed``) or any
    re-iterable of batches with a ``len`` (:mod:`~prunekit.training.data`).
    ``train_kwargs`` (``optimizer``, ``momentum``, ``weight_decay``, ``progress``,
    ``loss_fn``, ``step``) go to :func:`~prunekit.training.loop.fit`. Raises
    :class:`ScheduleError` before training when the schedule would end after the last
    step, so ``pruner.target`` would never be reached.
    """
    _check_model(model, pruner)
    steps = steps_per_epoch(data, batch_size)
    last = pruner.step_count + epochs * steps
    end = pruner.schedule.milestones()[-1]
    if last < end:
        raise ScheduleError(
            f"{pruner.schedule!r} ends at step {end}, but training stops at step {last} "
            f"({epochs} epochs of {steps} steps, from step {pruner.step_count}); "
            "Fix: train longer or end the schedule earlier."
        )
    batches = training_batches(data, batch_size, seed)
    return fit(model, batches, epochs=epochs, lr=lr, callback=lambda _: pruner.step(),
               **train_kwargs)  # fmt: skip
