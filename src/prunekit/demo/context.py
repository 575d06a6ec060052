"""What every section of the demo shares: the budget, the trained LeNets and their data.

Both LeNets read the same image-shaped mnist5k split (LeNet-300-100 flattens its input),
train once with Adam, and every section prunes private copies of them. Models and data
live on one device (the split is small enough to move there whole).
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunekit import zoo
from prunekit.analysis.profile import Profile, measure_latencies, profile
from prunekit.analysis.timing import Speedup, speedup
from prunekit.masks import bake
from prunekit.pruning import prune

DATASET = "mnist5k"
LR = 1e-3
FINETUNE_LR = 3e-4
REPEATS = 5  # interleaved turns of a speed-up: its median and spread


@dataclass(frozen=True)
class Budget:
    """How much work the demo does.

    ``train_images`` / ``train_epochs``: every training from scratch; ``finetune_images``
    / ``finetune_epochs``: every fine-tuning after a prune; ``sweep_sparsities`` and
    ``sweep_seeds``: the accuracy-vs-sparsity curves; ``lottery_rounds`` /
    ``synflow_rounds``: rounds of those methods; ``timing_batch`` / ``min_run_time``: the
    latency measurements (images per forward pass, seconds of timing).
    """

    train_images: int
    train_epochs: int
    finetune_images: int
    finetune_epochs: int
    sweep_sparsities: tuple[float, ...]
    sweep_seeds: int
    lottery_rounds: int
    synflow_rounds: int
    timing_batch: int
    min_run_time: float


FULL = Budget(4000, 5, 4000, 1, (0.5, 0.7, 0.9, 0.95, 0.98), 2, 2, 20, 64, 0.1)
QUICK = Budget(600, 1, 256, 1, (0.5, 0.9), 1, 1, 3, 8, 0.005)


def renamed(record: object, columns: Mapping[str, str]) -> dict[str, object]:
    """A table row from a dict or a dataclass: ``{column: record's field}`` for each
    ``field -> column`` of ``columns``, in that order."""
    fields = record if isinstance(record, Mapping) else vars(record)
    return {column: fields[name] for name, column in columns.items()}


@dataclass(frozen=True)
class Trained:
    """A trained zoo model with its dense test accuracy and training time."""

    name: str
    model: nn.Module
    accuracy: float
    seconds: float


class Context:
    """The data, the budget and the two trained LeNets; helpers to train, fine-tune and
    evaluate copies of them. ``status(text)`` reports progress (the demo's progress bar);
    every model and tensor lives on ``device``."""

    def __init__(
        self,
        budget: Budget,
        seed: int,
        status: Callable[[str], None] = lambda _: None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.budget = budget
        self.seed = seed
        self.status = status
        self.device = torch.device(device)
        full = zoo.load_dataset(DATASET)
        tensors = ("x_train", "y_train", "x_test", "y_test")
        full = dataclasses.replace(full, **{k: getattr(full, k).to(self.device) for k in tensors})
        n = budget.train_images
        self.data = dataclasses.replace(full, x_train=full.x_train[:n], y_train=full.y_train[:n])
        m = budget.finetune_images
        self.finetune_data = (full.x_train[:m], full.y_train[:m])
        self.calibration = zoo.calibration_batches(self.data, n_batches=4, seed=seed)
        self.example = full.x_test[: budget.timing_batch]
        self.lenet300 = self.train_new("lenet300")
        self.lenet5 = self.train_new("lenet5")

    def fresh(self, name: str, seed: int | None = None) -> nn.Module:
        """An untrained zoo model initialised from ``seed`` (default: the demo's)."""
        torch.manual_seed(self.seed if seed is None else seed)
        return zoo.build_model(name).to(self.device)

    def train(self, model: nn.Module, seed: int | None = None) -> nn.Module:
        """Train ``model`` in place (Adam at :data:`LR`, the budget's images and epochs,
        masks kept) and return it."""
        seed = self.seed if seed is None else seed
        epochs = self.budget.train_epochs
        zoo.train(model, self.data, epochs=epochs, lr=LR, seed=seed, progress=False)
        return model

    def train_new(self, name: str, seed: int | None = None) -> Trained:
        """Train a fresh ``name`` and time it."""
        self.status(f"training {name}")
        start = time.perf_counter()
        model = self.train(self.fresh(name, seed), seed)
        return Trained(name, model, self.accuracy(model), time.perf_counter() - start)

    def copy(self, trained: Trained) -> nn.Module:
        """A private copy of a trained model."""
        return copy.deepcopy(trained.model)

    def accuracy(self, model: nn.Module) -> float:
        """Top-1 accuracy on the 1,000 test images."""
        return zoo.evaluate(model, self.data.x_test, self.data.y_test)

    def finetune(self, model: nn.Module, seed: int | None = None) -> float:
        """Fine-tune ``model`` in place (Adam at :data:`FINETUNE_LR`, the budget's
        fine-tuning images and epochs, masks kept) and return its accuracy."""
        seed = self.seed if seed is None else seed
        epochs = self.budget.finetune_epochs
        zoo.train(model, self.finetune_data, epochs=epochs, lr=FINETUNE_LR, seed=seed + 1,
                  progress=False)  # fmt: skip
        return self.accuracy(model)

    def measure(self, models: Sequence[nn.Module]) -> list[tuple[Profile, float]]:
        """Counts (:func:`prunekit.analysis.profile`) and milliseconds per forward pass of
        ``timing_batch`` test images of a baked copy of each model (masks then cost
        nothing), timed in interleaved turns (:func:`~prunekit.analysis.measure_latencies`)
        so that a change of load on a shared machine falls on all of them alike."""
        baked = [bake(copy.deepcopy(model)) for model in models]  # timed baked, callers keep masks
        counts = [profile(model, self.example, latency=False) for model in baked]
        run_time = self.budget.min_run_time * len(baked)
        seconds = measure_latencies(baked, self.example, min_run_time=run_time, rounds=5)
        return [(c, s * 1e3) for c, s in zip(counts, seconds, strict=True)]

    def speedups(self, models: Sequence[nn.Module]) -> list[tuple[Profile, Speedup | None]]:
        """Counts of a baked copy of each of ``models`` and the speed-up of each but the
        first over the first (:func:`prunekit.analysis.speedup`: the median ratio of
        :data:`REPEATS` interleaved turns, its spread and the load average; None for the
        first). An unreliable figure is not a warning here: its row says so."""
        baked = [bake(copy.deepcopy(model)) for model in models]
        counts = [profile(model, self.example, latency=False) for model in baked]
        seconds = 2 * self.budget.min_run_time
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            timed = [speedup(baked[0], b, self.example, repeats=REPEATS, min_run_time=seconds)
                     for b in baked[1:]]  # fmt: skip
        return list(zip(counts, [None, *timed], strict=True))

    def prune_and_finetune(
        self, trained: Trained, sparsity: float | None, **prune_kwargs: object
    ) -> tuple[nn.Module, dict[str, float]]:
        """Prune a copy of ``trained`` (:func:`prunekit.prune` with the calibration batches
        and the demo's seed), then fine-tune it. Returns the copy and its row: achieved
        sparsity of the pruned layers, accuracy after pruning and after fine-tuning."""
        model = self.copy(trained)
        report = prune(model, sparsity, data=self.calibration, seed=self.seed, **prune_kwargs)
        pruned = self.accuracy(model)
        row = {
            "sparsity": report.sparsity,
            "acc pruned": pruned,
            "acc fine-tuned": self.finetune(model),
        }
        return model, row
