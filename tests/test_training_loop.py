"""The training engine without the zoo: pipelines on a plain DataLoader with a training
step and an evaluate function of the user's, the loop's checks, the MaskSync hook, and
the layering (prunekit.training imports nothing of the application layer)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk
from prunekit.errors import DistributedError, MissingDataError
from prunekit.masks import get_mask
from prunekit.training import MaskSync, accuracy, fit, iterative_pruning, lottery
from prunekit.training.data import Shuffled

TRAINING = Path(pk.__file__).parent / "training"
APP = ("zoo", "analysis", "recipes", "demo", "cli", "model_spec", "export")


def blobs(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian blobs in 8-D: an easy, zoo-free classification problem."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    return torch.randn(n, 8, generator=g) + 2.0 * y[:, None], y


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))


@pytest.fixture(scope="module")
def loaders() -> tuple[DataLoader, DataLoader]:
    train = DataLoader(TensorDataset(*blobs()), batch_size=32, shuffle=True)
    test = DataLoader(TensorDataset(*blobs(seed=1)), batch_size=64)
    return train, test


def test_iterative_pruning_on_a_dataloader_with_a_users_step(loaders) -> None:
    train, test = loaders
    steps: list[int] = []

    def step(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        steps.append(len(batch[0]))
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    scores: list[float] = []

    def evaluate(model: nn.Module) -> float:
        scores.append(accuracy(model, test))
        return scores[-1]

    model = mlp()
    fit(model, train, epochs=3, lr=1e-2, progress=False)
    report = iterative_pruning(model, train, target=0.75, rounds=2, epochs=1, finetune_lr=1e-3,
                               step=step, evaluate=evaluate, progress=False)  # fmt: skip
    assert len(steps) == 2 * len(train) and sum(steps) == 2 * 256  # one pass a round
    assert pk.sparsity(model).total == pytest.approx(0.75, abs=1e-3)
    assert [report.dense_accuracy, *(a for r in report.rounds for a in (
        r.pruned_accuracy, r.retrained_accuracy))] == scores  # fmt: skip
    assert report.rounds[-1].retrained_accuracy > 0.9


def test_train_with_pruner_on_dict_batches() -> None:
    x, y = blobs()
    batches = [{"x": x[i : i + 64], "y": y[i : i + 64]} for i in range(0, 256, 64)]
    model = mlp()
    pruner = pk.Pruner(model, 0.5, schedule=pk.Iterative(steps=2, every=4))
    losses = pk.training.train_with_pruner(
        model, batches, pruner, epochs=2, lr=1e-2, progress=False,
        step=lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"]),
    )  # fmt: skip
    assert len(losses) == 2 and pruner.step_count == 8
    assert pruner.sparsity == pytest.approx(0.5, abs=1e-3)


def test_lottery_on_a_dataloader_takes_a_validation_score(loaders) -> None:
    train, test = loaders
    with pytest.raises(MissingDataError, match="validate="):
        lottery(mlp(), train, rounds=1, epochs=1, evaluate=lambda m: accuracy(m, test))
    report = lottery(mlp, train, rounds=1, epochs=2, lr=1e-2, control=False,
                     evaluate=lambda m: accuracy(m, test),
                     validate=lambda m: accuracy(m, train))  # fmt: skip
    assert [r.round for r in report.rounds] == [0, 1]
    assert report.rounds[1].accuracy > 0.9 and get_mask(report.model[0]) is not None


def test_the_users_batches_need_evaluate_and_must_be_reiterable(loaders) -> None:
    train, _ = loaders
    model = mlp()
    before = snapshot(model)
    with pytest.raises(MissingDataError, match=r"no test split .* Fix: pass evaluate="):
        iterative_pruning(model, train, target=0.5)
    with pytest.raises(MissingDataError, match="re-iterable"):
        iterative_pruning(model, iter(train), target=0.5, evaluate=lambda m: 0.0)
    assert_unchanged(model, before)


def test_fit_checks_its_arguments_before_training() -> None:
    x, y = blobs()
    model = mlp()
    before = snapshot(model)
    with pytest.raises(pk.PruningError, match="both given"):
        fit(model, [(x, y)], step=lambda m, b: m(b[0]).sum(), loss_fn=nn.functional.mse_loss)
    with pytest.raises(pk.PruningError, match="one-pass iterator"):
        fit(model, iter([(x, y)]), epochs=2)
    with pytest.raises(pk.UnknownChoiceError, match="adam, sgd"):
        fit(model, [(x, y)], optimizer="lbfgs")
    with pytest.raises(pk.PruningError, match="not an iterable of batches"):
        fit(model, x)
    assert_unchanged(model, before)


def test_shuffled_reshuffles_each_pass_from_its_seed() -> None:
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    first, again = Shuffled(x, y, 4, seed=3), Shuffled(x, y, 4, seed=3)
    assert len(first) == 3
    orders = [torch.cat([b[1] for b in first]) for _ in range(2)]
    assert all(torch.equal(torch.cat([b[1] for b in again]), o) for o in orders)  # same seed
    assert sorted(orders[0].tolist()) == list(range(10))
    assert not torch.equal(orders[0], orders[1])  # each pass (epoch) its own order


def test_mask_sync_hook() -> None:
    assert MaskSync.resolve(False) is None and MaskSync.resolve(None) is None
    with pytest.raises(DistributedError, match="init_process_group"):
        MaskSync.resolve(True)
    model = mlp()
    before = snapshot(model)
    for call in (lambda: MaskSync().register([model[0]]), lambda: MaskSync()(model)):
        with pytest.raises(DistributedError, match="init_process_group"):
            call()
    assert_unchanged(model, before)


def _imported(path: Path) -> list[str]:
    """The modules ``path`` imports (absolute names)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
    return out


def test_training_imports_nothing_of_the_app_layer() -> None:
    code = "import sys, prunekit.training; print([m for m in sys.modules if 'prunekit.zoo' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for path in sorted(TRAINING.glob("*.py")):
        for name in _imported(path):
            top = name.split(".")[1] if name.startswith("prunekit.") else ""
            assert top not in APP and not top.startswith("cli"), f"{path.name} imports {name}"
