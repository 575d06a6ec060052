"""Lottery tickets: per-layer rates, rewinding, the re-init control, bad input."""

from __future__ import annotations

import copy
import itertools
import re
import sys

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import prunekit as pk
from prunekit.masks import get_mask
from prunekit.zoo import load_dataset

FAST = {"epochs": 1, "lr": 1e-2, "batch_size": 256}


def tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", flat=True)


@pytest.fixture
def trainings(monkeypatch):
    """Spy on every training: the weights it starts from, its masks, its weights at step 3."""
    calls = []
    lottery = sys.modules["prunekit.training.lottery"]
    real = lottery.fit

    def spy(model, data, *, callback, **kwargs):
        call = {
            "start": _weights(model),
            "mask": get_mask(model[0]),
        }
        calls.append(call)

        def after(step):
            if step == 3:
                call["step3"] = _weights(model)
            callback(step)

        return real(model, data, callback=after, **kwargs)

    monkeypatch.setattr(lottery, "fit", spy)
    return calls


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The effective (masked) weights, as an ordinary state dict."""
    return {k: v.clone() for k, v in pk.masks.bake(copy.deepcopy(model)).state_dict().items()}


def test_rates_per_layer_and_output_layer_half(digits):
    report = pk.training.lottery(tiny, digits, rounds=2, rate=0.5, **FAST, control=False,
                                 include_output=True)  # fmt: skip
    sparsity = pk.sparsity(report.model, include_output=True)
    assert sparsity["0"] == pytest.approx(1 - 0.5**2, abs=1e-3)
    assert sparsity["2"] == pytest.approx(1 - 0.75**2, abs=1e-3)
    assert [r.round for r in report.rounds] == [0, 1, 2]
    assert report.rounds[0].remaining == 1.0
    assert report.rounds[2].remaining == pytest.approx((64 * 32 * 0.25 + 320 * 0.5625) / 2368, 1e-3)
    assert all(r.control_accuracy is None for r in report.rounds)
    for r in report.rounds:
        assert 1 <= r.best_epoch <= 1 and 0.5 < r.accuracy <= 1 and r.final_accuracy == r.accuracy
    assert "lottery ticket" in str(report) and "theta_0" in str(report)


def test_rewind_to_init_keeps_masks_and_resets_survivors(digits, trainings):
    pk.training.lottery(tiny, digits, rounds=2, rate=0.3, **FAST, control=False)
    theta0 = trainings[0]["start"]
    assert trainings[0]["mask"] is None
    for previous, call in itertools.pairwise(trainings[1:]):
        assert not (call["mask"] & ~previous["mask"]).any()  # masks persist and only grow
    for call in trainings[1:]:
        mask = call["mask"]
        assert mask is not None
        torch.testing.assert_close(
            call["start"]["0.weight"], theta0["0.weight"] * mask, rtol=0, atol=0
        )
        torch.testing.assert_close(call["start"]["0.bias"], theta0["0.bias"], rtol=0, atol=0)
    assert trainings[2]["mask"].sum() < trainings[1]["mask"].sum()


def test_rewind_to_early_iteration(digits, trainings):
    report = pk.training.lottery(tiny, digits, rounds=1, rewind=3, **FAST, control=False)
    theta3 = trainings[0]["step3"]
    assert not torch.equal(theta3["0.weight"], trainings[0]["start"]["0.weight"])
    mask = trainings[1]["mask"]
    torch.testing.assert_close(
        trainings[1]["start"]["0.weight"], theta3["0.weight"] * mask, rtol=0, atol=0
    )
    assert "theta_3" in str(report)


def test_random_reinit_control_has_same_masks_fresh_weights(digits, trainings):
    report = pk.training.lottery(tiny, digits, rounds=1, **FAST, control=True)
    _dense, ticket, control = trainings
    assert torch.equal(ticket["mask"], control["mask"])
    assert not torch.equal(control["start"]["0.weight"], ticket["start"]["0.weight"])
    assert report.rounds[0].control_accuracy is None
    assert 0 < report.rounds[1].control_accuracy <= 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rewind": 10_000}, "rewind=10000"),
        ({"rewind": "late"}, "rewind='late'"),
        ({"rate": 1.0}, "rate=1.0"),
        ({"rounds": -1}, "rounds=-1"),
        ({"val_fraction": 0.0}, "val_fraction"),
    ],
)
def test_bad_arguments_leave_model_unchanged(digits, kwargs, match):
    torch.manual_seed(0)
    model = tiny()
    before = snapshot(model)
    with pytest.raises(pk.PruningError, match=match):
        pk.training.lottery(model, digits, epochs=1, **kwargs)
    assert_unchanged(model, before)


def test_an_output_rate_for_a_dense_output_layer_is_refused(digits, tmp_path):
    torch.manual_seed(0)
    model = tiny()
    before = snapshot(model)
    with pytest.raises(pk.PruningError, match=r"output_rate=0\.1 .* output layer '2' dense; "
                       r"Fix: pass include_output=True"):  # fmt: skip
        pk.training.lottery(model, digits, epochs=1, output_rate=0.1,
                            checkpoint_dir=tmp_path / "ckpt")  # fmt: skip
    assert_unchanged(model, before)
    assert not (tmp_path / "ckpt").exists()
    report = pk.training.lottery(tiny, digits, rounds=1, rate=0.5, output_rate=0.1, **FAST,
                                 control=False, include_output=True)  # fmt: skip
    assert pk.sparsity(report.model, include_output=True)["2"] == pytest.approx(0.1, abs=2e-3)


def test_masked_model_is_refused(digits, tmp_path):
    model = tiny()
    pk.prune(model, 0.5, include_output=True)
    before = snapshot(model)
    with pytest.raises(pk.PruningError, match=r"\['0', '2'\] are already masked.*masks\.remove"):
        pk.training.lottery(model, digits, epochs=1, checkpoint_dir=tmp_path / "ckpt")
    assert_unchanged(model, before)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("where", ["a file", "/dev/zero", 5])
@pytest.mark.parametrize("pipeline", ["lottery", "iterative_pruning"])
def test_a_checkpoint_dir_that_cannot_hold_one_is_refused_before_round_1(
    digits, tmp_path, where, pipeline
):
    (tmp_path / "a file").write_text("not a folder")
    path = tmp_path / where if where == "a file" else where
    torch.manual_seed(0)
    model = tiny()
    before = snapshot(model)
    kwargs = {"epochs": 1, "rounds": 1, "checkpoint_dir": path}
    with pytest.raises(pk.errors.CheckpointError, match=re.escape(str(path))):
        if pipeline == "lottery":
            pk.training.lottery(model, digits, control=False, **kwargs)
        else:
            pk.training.iterative_pruning(model, digits, target=0.5, progress=False, **kwargs)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rounds": 0}, r"lottery\.rounds=0 is not an int 1\.\.1000000"),
        ({"rounds": 2**63}, r"rounds=9223372036854775808"),
        ({"epochs": 0}, r"lottery\.epochs=0"),
        ({"batch_size": True}, r"lottery\.batch_size=True"),
        ({"seed": -1}, r"lottery\.seed=-1"),
        ({"rate": torch.tensor(0.2)}, r"lottery\.rate=tensor"),
        ({"model": "lenet"}, r"model='lenet' \(str\) is neither an nn\.Module nor a factory"),
    ],
)
def test_bad_numbers_are_refused_before_round_0(digits, kwargs, match):
    torch.manual_seed(0)
    model = kwargs.pop("model", None) or tiny()
    with pytest.raises(pk.PruningError, match=match):
        pk.training.lottery(model, digits, **{"epochs": 1, **kwargs})
