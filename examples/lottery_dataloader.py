"""A lottery ticket from your own model and your own DataLoader.

Iterative magnitude pruning with rewinding (Frankle & Carbin 2019;
``pk.training.lottery``) on a network and data that are not prunekit's: a small MLP
written here, scikit-learn's digits in ``torch.utils.data.DataLoader`` objects over
``TensorDataset``s, our own training step and our own validation and test scores. Each
round prunes 20% of the surviving weights of every layer (10% in the output layer),
rewinds the survivors to their initial values and trains again; the random
re-initialisation control trains every round's masks from fresh weights.

    python examples/lottery_dataloader.py           # the full run
    python examples/lottery_dataloader.py --quick   # a smoke run: the same path, small (CI runs it)
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk


class MLP(nn.Module):
    """64 -> 128 -> 64 -> 10, ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))


def loaders(seed: int, limit: int | None) -> dict[str, DataLoader]:
    """train / val / test DataLoaders over digits (70 / 15 / 15%), pixels in [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:limit]
    x, y = x[order], y[order]
    a, b = int(0.7 * len(y)), int(0.85 * len(y))
    # A seeded generator: the shuffling order is the same in every run.
    train = DataLoader(TensorDataset(x[:a], y[:a]), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    return {"train": train,
            "val": DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=256),
            "test": DataLoader(TensorDataset(x[b:], y[b:]), batch_size=256)}


def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Our training step: cross-entropy with a little label smoothing."""
    x, y = batch
    return F.cross_entropy(model(x), y, label_smoothing=0.05)


@torch.no_grad()
def accuracy(loader: DataLoader, model: nn.Module) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` in eval mode (mode restored)."""
    was_training = model.training
    model.eval()
    right = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
    model.train(was_training)
    return right / len(loader.dataset)


def main(argv: list[str] | None = None) -> pk.training.LotteryReport:
    """Search the ticket; returns the report (``report.model`` is the last ticket)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny and short")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=None,
                        help="resume here if killed (same command again)")
    args = parser.parse_args(argv)
    rounds, epochs, limit = (1, 1, 300) if args.quick else (5, 8, None)
    data = loaders(args.seed, limit)
    report = pk.training.lottery(
        MLP,                              # a factory, called under torch.manual_seed(seed)
        data["train"],
        rounds=rounds, rate=0.2, rewind="init", epochs=epochs, lr=3e-3, seed=args.seed,
        include_output=True,              # Frankle & Carbin: the output layer at rate / 2
        step=step,
        evaluate=partial(accuracy, data["test"]),
        validate=partial(accuracy, data["val"]),  # picks each training's early-stop epoch
        checkpoint_dir=args.checkpoint_dir,
    )
    print(report)
    counts = pk.sparsity(report.model, include_output=True)
    print(f"last ticket: {1 - counts.total:.1%} of {counts.numel:,} weights left; per layer "
          + ", ".join(f"{layer.name} {1 - layer.zeros / layer.numel:.1%}"
                      for layer in counts.layers))
    return report


if __name__ == "__main__":
    main()
