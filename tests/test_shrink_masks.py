"""pk.shrink after masking: ratio=None removes exactly the masked groups (and refuses a
model without any), element masks stay on the shrunk weights, sliced like them."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import assert_unchanged, snapshot
from test_bad_inputs import structure
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import prunekit as pk
from prunekit.errors import ShrinkVerificationError
from prunekit.masks import get_mask
from prunekit.structured.surgery import remove

shrink_module = importlib.import_module("prunekit.structured.shrink")
X = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))


def mlp() -> nn.Module:
    """No biases: a masked filter outputs exactly zero, so the masked model is the
    group-masked one and the shrunk model must equal it."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU(),
        nn.Linear(32, 4),
    ).eval()  # fmt: skip


def filter_and_element_masked() -> nn.Module:
    model = mlp()
    pk.prune(model, 0.5, granularity="filter", criterion="l2", layers=["0", "2"])
    pk.prune(model, 0.75, granularity="element", layers=["0", "2"])  # 50% of what is left
    return model


def test_element_masks_survive_shrinking_and_training() -> None:
    model = filter_and_element_masked()
    masks = {name: get_mask(model.get_submodule(name)) for name in ("0", "2")}
    dead0, dead2 = (~masks[n].any(1) for n in ("0", "2"))  # whole rows masked: groups
    with torch.no_grad():
        expected = model(X)
    report = pk.shrink(model, X)

    assert [f.kept for f in report.families] == [int((~dead0).sum()), int((~dead2).sum())]
    assert report.summary == f"removed the {int(dead0.sum() + dead2.sum())} masked groups " \
        "(all-zero weights)"  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected, rtol=0, atol=1e-5)  # (a)
    kept = {"0": masks["0"][~dead0], "2": masks["2"][~dead2][:, ~dead0]}
    for name, want in kept.items():  # (c) exactly the kept part's masked elements
        layer = model.get_submodule(name)
        assert parametrize.is_parametrized(layer, "weight")
        assert torch.equal(get_mask(layer), want)
        assert int((~get_mask(layer)).sum()) == int((~want).sum()) > 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(2):  # (b) the pruned zeros stay zero while training
        optimizer.zero_grad()
        model(X).square().sum().backward()
        optimizer.step()
    for name, want in kept.items():
        assert not model.get_submodule(name).weight[~want].any()
    assert model[4].in_features == int((~dead2).sum())


def test_group_masks_go_with_their_groups() -> None:
    model = mlp()
    pk.prune(model, 0.5, granularity="filter", criterion="l2", layers=["0"])
    report = pk.shrink(model, X)
    assert report.families[0].kept == 16 and model[0].out_features == 16
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_a_ratio_keeps_the_masks_of_kept_groups() -> None:
    model = mlp()
    pk.prune(model, 0.5, granularity="element", layers=["0", "2"])
    masked = copy.deepcopy(model)
    report = pk.shrink(model, X, ratio=0.5)  # verify compares with the group-masked model
    assert report.summary == "removed 50% of each family's groups by l2 (32 groups)"
    assert [f.kept for f in report.families] == [16, 16]
    kept0 = [i for i in range(32) if i not in report.families[0].removed]
    assert torch.equal(get_mask(model[0]), get_mask(masked[0])[kept0])
    assert report.deviation is not None and report.deviation < 1e-5


def test_nm_masks_are_kept_too() -> None:
    model = mlp()
    pk.prune(model, None, granularity="2:4", layers=["0", "2"])
    before = int((~get_mask(model[2])).sum())
    pk.shrink(model, X, ratio=0.25)
    after = int((~get_mask(model[2])).sum())
    assert 0 < after < before and model[2].weight.shape == (24, 24)
    assert not model[2].weight[~get_mask(model[2])].any()


@pytest.mark.parametrize("granularity", [None, "element"])
def test_without_masked_groups_ratio_none_refuses_and_changes_nothing(granularity) -> None:
    model = mlp()
    if granularity:
        pk.prune(model, 0.3, granularity=granularity, layers=["0", "2"])  # no whole row
    before, shape = snapshot(model), structure(model)
    with pytest.raises(pk.InvalidSparsityError) as err:
        pk.shrink(model, X)
    assert str(err.value) == (
        "no masked channel group to remove in Sequential; Fix: pass ratio=0.5 (fraction of "
        "groups to remove) or prune with pk.prune(model, s, granularity='filter') first"
    )
    assert_unchanged(model, before)
    assert structure(model) == shape


def test_a_parametrization_it_cannot_slice_is_refused_first() -> None:
    model = mlp()
    pk.prune(model, 0.5, granularity="filter", layers=["0"])
    parametrizations.weight_norm(model[2])
    before, shape = snapshot(model), structure(model)
    with pytest.raises(pk.IncompatibleLayerError, match=r"layer '2'.*_WeightNorm.*Fix: .*"
                       r"remove_parametrizations.*Nothing was changed"):  # fmt: skip
        pk.shrink(model, X)
    assert_unchanged(model, before)
    assert structure(model) == shape


def test_a_failed_verification_restores_the_masks(monkeypatch) -> None:
    model = filter_and_element_masked()
    before, shape = snapshot(model), structure(model)

    def broken(model, graph, removed, *made):
        out = remove(model, graph, removed, *made)
        with torch.no_grad():
            model[0].weight[0] += 1.0  # masks are registered again after removal
        return out

    monkeypatch.setattr(shrink_module, "remove", broken)
    with pytest.raises(ShrinkVerificationError, match="was undone"):
        pk.shrink(model, X)
    assert_unchanged(model, before)
    assert structure(model) == shape


def _two_convs(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=bias), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=bias), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 4),
    )  # fmt: skip


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_masked_groups_that_still_emit_a_bias_are_reported(bias: bool, verify: bool) -> None:
    model, x = _two_convs(bias), torch.randn(2, 3, 10, 10)
    pk.prune(model, 0.5, granularity="filter", criterion="l2")
    with torch.no_grad():
        before = model(x)
    report = pk.shrink(model, x, verify=verify)
    assert report.macs_after == pk.cost.count_macs(model, x) < report.macs_before
    with torch.no_grad():
        moved = (model(x) - before).abs().max().item()
    assert report.summary.startswith("removed the 8 masked groups")
    notes = [n for n in report.notes if "still emitted a bias" in n]
    if bias:  # the zeroed filters' biases went with them: said, with the measured departure
        assert moved > 1e-3 and len(notes) == 1 and "differs from your masked model" in notes[0]
    else:  # nothing else came out of those channels: the same function, no note
        assert moved < 1e-5 and not notes


@pytest.mark.parametrize("verify", [True, False])
def test_removing_masked_groups_runs_the_caller_model_no_more_than_needed(verify: bool) -> None:
    """One pass of the shrunk model (the trace runs a baked copy): verify's check gives the
    outputs the departure note compares and the MACs after; without verify one counted
    pass does (it was two passes either way)."""
    model, x = _two_convs(True), torch.randn(2, 3, 10, 10)
    pk.prune(model, 0.5, granularity="filter", criterion="l2")
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(m) if m is model else None)
    pk.shrink(model, x, verify=verify)
    assert len(calls) == 1
