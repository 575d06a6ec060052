"""Pruning during training: soft filter pruning (He 2018) and network slimming (Liu 2017)."""

from __future__ import annotations

import math

import pytest
import torch

import prunekit as pk
from prunekit.training import during
from prunekit.training.during import bn_l1, network_slimming, soft_filter_pruning
from prunekit.zoo import SmallVGG, load_dataset

X = torch.zeros(1, 1, 8, 8)
WIDTHS = (16, 32, 64)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _vgg() -> SmallVGG:
    torch.manual_seed(0)
    return SmallVGG(in_channels=1, widths=WIDTHS)


def _convs(model: SmallVGG) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("criterion", ["l2", "fpgm"])
def test_soft_filter_pruning_shrinks_every_conv_family(digits, criterion: str) -> None:
    model = _vgg()
    report = soft_filter_pruning(model, digits, X, ratio=0.3, epochs=2, criterion=criterion)
    assert _convs(model) == [w - math.floor(0.3 * w) for w in WIDTHS]
    assert model(X).shape == (1, 10)
    assert len(report.epoch_accuracy) == 2
    assert all(0.0 <= a <= 1.0 for a in (*report.epoch_accuracy, report.final_accuracy))
    assert report.final_accuracy > 0.3  # trained, not destroyed by the zeroing
    assert report.shrink is not None and report.shrink.macs_after < report.shrink.macs_before
    assert "soft filter pruning" in str(report)


def _slices(model: torch.nn.Module, groups) -> list[torch.Tensor]:
    """Every parameter slice of ``groups`` (conv filter, BatchNorm entries, consumer inputs)."""
    params = dict(model.named_parameters())
    return [
        params[m.name].detach().index_select(m.dim, m.index).clone()
        for g in groups
        for m in g.members
        if m.name in params
    ]


def test_soft_filter_pruning_lets_zeroed_filters_regrow(digits, monkeypatch) -> None:
    zeroings = []  # per epoch: the groups zeroed, their slices before and after
    real = during.zero_groups

    def spy(model, groups):
        previous = zeroings[-1]["groups"] if zeroings else []
        zeroings.append({"groups": groups, "regrown": _slices(model, previous)})
        real(model, groups)
        zeroings[-1]["zeroed"] = _slices(model, groups)

    monkeypatch.setattr(during, "zero_groups", spy)
    torch.manual_seed(0)
    model = SmallVGG(in_channels=1, widths=(4, 8, 8))
    soft_filter_pruning(model, digits, X, ratio=0.5, epochs=2, batch_size=256)
    first, second = zeroings
    assert len(first["groups"]) == 2 + 4 + 4  # floor(0.5 * width) per family
    assert all(not t.any() for t in first["zeroed"])  # zeroed after epoch 1 ...
    assert len(second["regrown"]) == len(first["zeroed"]) >= 3 * len(first["groups"])
    assert all(t.any() for t in second["regrown"])  # ... every slice nonzero after epoch 2
    assert _convs(model) == [2, 4, 4]  # the exact per-family counts after the final shrink


def test_slimming_penalty_shrinks_bn_scales(digits) -> None:
    sums = []
    for lam in (0.0, 5e-2):
        model = _vgg()
        network_slimming(model, digits, X, ratio=0.0, sparsity_lambda=lam, epochs=1,
                         finetune_epochs=0)  # fmt: skip
        assert _convs(model) == list(WIDTHS)  # ratio 0 removes nothing
        sums.append(bn_l1(model).item())
    assert sums[1] < sums[0] - 1.0


def test_slimming_shrinks_globally_and_finetunes(digits) -> None:
    model = _vgg()
    report = network_slimming(model, digits, X, ratio=0.5, sparsity_lambda=1e-3, epochs=1,
                              finetune_epochs=1)  # fmt: skip
    assert sum(_convs(model)) == sum(WIDTHS) - sum(WIDTHS) // 2
    assert model(X).shape == (1, 10)
    assert len(report.epoch_accuracy) == 2
    assert 0.0 <= report.final_accuracy <= 1.0
    assert report.shrink is not None and report.shrink.params_after < report.shrink.params_before


def test_bad_arguments_leave_the_model_unchanged(digits) -> None:
    model = _vgg()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pk.InvalidSparsityError):
        soft_filter_pruning(model, digits, X, ratio=1.5, epochs=1)
    with pytest.raises(pk.InvalidSparsityError):
        network_slimming(model, digits, X, ratio=-0.1, epochs=1)
    with pytest.raises(pk.UnknownChoiceError):
        soft_filter_pruning(model, digits, X, criterion="taylor", epochs=1)
    with pytest.raises(pk.PruningError, match="no affine BatchNorm"):
        network_slimming(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
                         digits, X, epochs=1)  # fmt: skip
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
