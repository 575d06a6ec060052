"""A minimal, deterministic training loop, accuracy evaluation and calibration batches."""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import UnknownChoiceError
from prunekit.inputs import eval_mode, set_mode
from prunekit.tables import progress_bar
from prunekit.zoo.data import Dataset, batches

Data = Dataset | tuple[Tensor, Tensor]


def train_xy(data: Data) -> tuple[Tensor, Tensor]:
    """The training ``(x, y)`` of a ``Dataset``, or the pair itself."""
    return (data.x_train, data.y_train) if isinstance(data, Dataset) else data


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """The default training loss, for classification ``((B, C), (B,))`` and language
    modelling ``((B, T, V), (B, T))`` alike."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


def steps_per_epoch(data: Data, batch_size: int) -> int:
    """``ceil(n / batch_size)``: the optimizer steps of one epoch over ``data``'s ``n``
    training examples (the last batch may be short), as :func:`train` takes them."""
    return -(-len(train_xy(data)[0]) // batch_size)


def train(
    model: nn.Module,
    data: Data,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 64,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    seed: int = 0,
    progress: bool = True,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    callback: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``model`` in place on a ``Dataset``'s training split or an ``(x, y)`` pair.

    ``optimizer`` is ``"adam"`` or ``"sgd"`` (with ``momentum``). The batch order is drawn
    from a generator seeded with ``seed``, so equal seeds and equal initial weights give
    equal results. ``loss_fn(logits, y)`` defaults to cross-entropy. ``callback(step)`` runs
    after every optimizer step, with ``step`` the number of steps taken so far (1, 2, ...).
    Returns the mean training loss of each epoch.
    """
    if optimizer not in ("adam", "sgd"):
        raise UnknownChoiceError("optimizer", optimizer, ["adam", "sgd"])
    x, y = train_xy(data)
    loss_fn = loss_fn or cross_entropy
    params = model.parameters()
    opt = (
        torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        if optimizer == "adam"
        else torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    )
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    per_epoch = steps_per_epoch((x, y), batch_size)
    step, losses = 0, []
    with set_mode(model, True), progress_bar(disable=not progress) as bar:
        task = bar.add_task("training", total=epochs * per_epoch)
        for epoch in range(epochs):
            total = 0.0
            for xb, yb in batches(x, y, batch_size, shuffle=True, generator=gen):
                loss = loss_fn(model(xb.to(device)), yb.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if callback is not None:
                    callback(step)
                total += loss.item() * len(xb)
                desc = f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}"
                bar.update(task, advance=1, description=desc)
            losses.append(total / len(x))
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in [0, 1] (per token for sequence outputs),
    computed in eval mode; the model's previous train/eval mode is restored."""
    device = next(model.parameters()).device
    correct = 0
    with eval_mode(model):
        for xb, yb in batches(x, y, batch_size):
            correct += (model(xb.to(device)).argmax(-1) == yb.to(device)).sum().item()
    return correct / y.numel()


def calibration_batches(
    dataset: Data, n_batches: int = 4, batch_size: int = 64, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """``n_batches`` shuffled training batches (seeded), for data-driven pruning criteria."""
    x, y = train_xy(dataset)
    gen = torch.Generator().manual_seed(seed)
    return list(islice(batches(x, y, batch_size, shuffle=True, generator=gen), n_batches))
