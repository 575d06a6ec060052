"""Pruning after training (Han et al. 2015): prune -> retrain rounds, q * std thresholds."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, snapshot

import prunekit as pk
from prunekit.errors import PruningError
from prunekit.training.post import han_sparsities, iterative_pruning
from prunekit.zoo import LeNet300100, calibration_batches, load_dataset, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", flat=True)


@pytest.fixture(scope="module")
def dense_state(digits) -> dict[str, torch.Tensor]:
    """LeNet-300-100 trained once for the module; each test gets a fresh copy."""
    torch.manual_seed(0)
    model = LeNet300100(in_features=64)
    train(model, digits, epochs=4, lr=3e-3, progress=False)
    return model.state_dict()


def _trained(dense_state) -> LeNet300100:
    model = LeNet300100(in_features=64)
    model.load_state_dict(dense_state)
    return model


def test_han_threshold_is_q_std_per_layer() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(100, 10))
    w = model[0].weight.detach()
    want = float((w.abs() < 0.7 * w.std()).float().mean())
    assert han_sparsities(model, 0.7) == {"0": pytest.approx(want)}


def test_han_mapping_must_cover_the_selected_layers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    with pytest.raises(PruningError, match=r"no threshold for layers \['1'\]; Fix: add them"):
        han_sparsities(model, {"0": 0.7})
    assert set(han_sparsities(model, {"0": 0.7}, ["0"])) == {"0"}


def test_iterative_pruning_reaches_the_target_and_recovers(digits, dense_state) -> None:
    model = _trained(dense_state)
    report = iterative_pruning(model, digits, target=0.8, rounds=2, epochs=2, finetune_lr=1e-3,
                               progress=False)  # fmt: skip
    sparsities = [r.sparsity for r in report.rounds]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.8, abs=1e-3)
    assert pk.sparsity(model).total == pytest.approx(0.8, abs=1e-3)
    last = report.rounds[-1]
    assert last.retrained_accuracy > last.pruned_accuracy  # retraining recovers
    assert last.retrained_accuracy >= report.dense_accuracy - 0.03
    assert "iterative pruning" in str(report)


def test_q_threshold_rounds_only_grow(digits, dense_state) -> None:
    model = _trained(dense_state)
    report = iterative_pruning(model, digits, q=0.5, rounds=2, epochs=1, progress=False,
                               include_output=True)  # fmt: skip
    first, second = (r.sparsity for r in report.rounds)
    assert 0.2 < first < second < 1.0
    assert set(report.kept) == {"fc1", "fc2", "fc3"}


def test_per_layer_q_prunes_each_layer_by_its_own_threshold(digits, dense_state) -> None:
    model = _trained(dense_state)
    q = {"fc1": 1.0, "fc3": 0.25}
    expected = han_sparsities(model, q, list(q))
    assert expected["fc1"] > 0.5 > expected["fc3"] > 0.1
    report = iterative_pruning(model, digits, q=q, rounds=1, epochs=1, progress=False,
                               include_output=True)  # fmt: skip
    assert report.kept == {n: pytest.approx(1 - s, abs=1e-9) for n, s in expected.items()}
    assert pk.masks.get_mask(model.fc2) is None  # not in the mapping: not pruned


def test_data_driven_criterion_uses_calibration_batches(digits, dense_state) -> None:
    model = _trained(dense_state)
    batches = calibration_batches(digits, n_batches=2)
    report = iterative_pruning(model, digits, target=0.6, rounds=1, epochs=1, criterion="taylor",
                               scope="local", calibration=batches, progress=False)  # fmt: skip
    assert report.rounds[0].sparsity == pytest.approx(0.6, abs=1e-3)
    assert all(s == pytest.approx(0.6, abs=1e-2) for s in pk.sparsity(model).to_dict().values())


BAD = [
    (dict(target=0.5, q=1.0), pk.PruningError, "exactly one of target= .* or q="),
    (dict(), pk.PruningError, "exactly one of target="),
    (dict(q=-0.5), pk.PruningError, r"q=-0\.5 must be a number > 0"),
    (dict(q={"fc1": 1.0, "fc2": 0.0}), pk.PruningError, r"q=\{'fc1': 1\.0, 'fc2': 0\.0\} must"),
    (dict(q={"fc1": 1.0, "fc9": 1.0}), pk.PruningError,
     r"no prunable layer matched layers=\['fc1', 'fc9'\] \(entry 'fc9'\): did you mean"),
    (dict(q={"fc1": 1.0}, layers=["fc1", "fc2"]), pk.PruningError, "one q per pruned layer"),
    (dict(q={"fc1": 1.0, "fc3": 0.5}), pk.PruningError,
     r"the pruned layers are \['fc1'\]; layer 'fc3' is kept dense by default as the output "
     r"layer; Fix: include_output=True to prune 'fc3', or drop 'fc3' from q\.$"),
    (dict(target=1.5), pk.InvalidSparsityError, r"target=1\.5"),
    (dict(target=0.5, rounds=0), pk.PruningError, r"rounds=0 must be an int >= 1"),
    (dict(target=0.2), pk.InvalidSparsityError, r"target=0\.2 is below .* \(0\.3\)"),
    (dict(target=0.5, criterion="hessian"), pk.UnknownChoiceError, "'hessian'"),
    (dict(target=0.5, criterion="taylor"), pk.MissingDataError, "as calibration="),
    (dict(target=0.5, criterion="taylor", calibration=iter([])), pk.MissingDataError,
     "calibration is a one-pass iterator"),
    (dict(target=0.5, layers=["nothing"]), pk.NoLayersError, "nothing"),
    (dict(q=1.0, layers=["nothing"]), pk.NoLayersError, "nothing"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_arguments_touch_nothing(digits, tmp_path, kwargs, error, match) -> None:
    torch.manual_seed(0)
    model = LeNet300100(in_features=64)
    pk.prune(model, 0.3, scope="global")  # a pruned model keeps its masks too
    before = snapshot(model)
    with pytest.raises(error, match=match):
        iterative_pruning(model, digits, checkpoint_dir=tmp_path / "ckpt", **kwargs)
    assert_unchanged(model, before)
    assert not (tmp_path / "ckpt").exists()
