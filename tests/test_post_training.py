"""Pruning after training (Han et al. 2015): prune -> retrain rounds, q * std thresholds."""

from __future__ import annotations

import pytest
import torch

import prunekit as pk
from prunekit.training.post import han_sparsities, iterative_pruning
from prunekit.zoo import LeNet300100, load_dataset, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", flat=True)


def _trained(digits) -> LeNet300100:
    torch.manual_seed(0)
    model = LeNet300100(in_features=64)
    train(model, digits, epochs=4, lr=3e-3, progress=False)
    return model


def test_han_threshold_is_q_std_per_layer() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(100, 10))
    w = model[0].weight.detach()
    want = float((w.abs() < 0.7 * w.std()).float().mean())
    assert han_sparsities(model, 0.7) == {"0": pytest.approx(want)}


def test_iterative_pruning_reaches_the_target_and_recovers(digits) -> None:
    model = _trained(digits)
    report = iterative_pruning(model, digits, target=0.8, rounds=2, epochs=2, finetune_lr=1e-3,
                               progress=False)  # fmt: skip
    sparsities = [r.sparsity for r in report.rounds]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.8, abs=1e-3)
    assert pk.sparsity(model).total == pytest.approx(0.8, abs=1e-3)
    last = report.rounds[-1]
    assert last.retrained_accuracy > last.pruned_accuracy  # retraining recovers
    assert last.retrained_accuracy >= report.dense_accuracy - 0.03
    assert "iterative pruning" in str(report)


def test_q_threshold_rounds_only_grow(digits) -> None:
    model = _trained(digits)
    report = iterative_pruning(model, digits, q=0.5, rounds=2, epochs=1, progress=False)
    first, second = (r.sparsity for r in report.rounds)
    assert 0.2 < first < second < 1.0
    assert set(report.kept) == {"fc1", "fc2", "fc3"}


def test_bad_arguments(digits) -> None:
    model = LeNet300100(in_features=64)
    with pytest.raises(pk.PruningError, match="exactly one"):
        iterative_pruning(model, digits, target=0.5, q=1.0)
    with pytest.raises(pk.InvalidSparsityError):
        iterative_pruning(model, digits, target=1.5)
    with pytest.raises(pk.PruningError, match="rounds=0"):
        iterative_pruning(model, digits, target=0.5, rounds=0)
    assert pk.masks.get_mask(model.fc1) is None
