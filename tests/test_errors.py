"""Bad input: a clear PruningError subclass naming the layer, value and fix; model untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import prunekit as pk
from prunekit.errors import UserCallbackError


@pytest.fixture(params=["fresh", "masked"])
def model(request, convnet):
    if request.param == "masked":  # a second prune must also leave existing masks alone
        pk.prune(convnet, 0.3)
    convnet.register_forward_hook(lambda *a: None)
    return convnet


def batches():
    return [(torch.randn(2, 4, 4, 4), torch.randint(0, 4, (2,)))]


CASES = [
    (dict(sparsity=1.0), pk.InvalidSparsityError, r"sparsity=1\.0 .* \[0, 1\)"),
    (dict(sparsity=-0.1), pk.InvalidSparsityError, r"sparsity=-0\.1"),
    (dict(sparsity=float("nan")), pk.InvalidSparsityError, "nan"),
    (dict(sparsity=True), pk.InvalidSparsityError, "True"),
    (dict(sparsity="0.5"), pk.InvalidSparsityError, "'0.5'"),
    (dict(), pk.InvalidSparsityError, "needs sparsity"),
    (
        dict(sparsity=0.5, granularity="diagonal"),
        pk.UnknownChoiceError,
        "valid granularity values are: element, row, column, kernel, filter, channel",
    ),
    (
        dict(sparsity=0.5, criterion="hessian"),
        pk.UnknownChoiceError,
        "valid criterion values are: gradient, grasp, l1, l2, magnitude, random, snip, "
        "synflow, taylor, wanda$",
    ),
    (
        dict(sparsity=0.5, scope="regional"),
        pk.PruningError,
        "valid scope values are: local, global",
    ),
    (dict(sparsity=0.5, allocation="lamp"), pk.UnknownChoiceError, "valid allocation values"),
    (dict(sparsity=0.5, scope="global", allocation="erk"), pk.PruningError, "takes no allocation"),
    (dict(sparsity=0.3, granularity="2:4"), pk.InvalidSparsityError, "fixes sparsity at 0.5"),
    (
        dict(granularity="4:8", layers=["conv"]),
        pk.IncompatibleLayerError,
        r"layer 'conv': 4:8 needs the input axis \(4\) to be a multiple of M=8",
    ),
    (
        dict(sparsity=0.5, granularity="kernel", layers=["head"], include_output=True),
        pk.IncompatibleLayerError,
        "layer 'head': Linear has no kernel",
    ),
    (
        dict(sparsity=0.5, granularity="block:3x3", layers=["head"], include_output=True),
        pk.IncompatibleLayerError,
        "layer 'head': block 3x3 does not tile its 4x8 matrix",
    ),
    (
        dict(sparsity=0.5, layers="nothing*"),
        pk.NoLayersError,
        r"no prunable layer matched layers='nothing\*'.*\['conv', 'depthwise', 'up', 'head'\]",
    ),
    (dict(sparsity=0.5, criterion="taylor"), pk.MissingDataError, "needs calibration batches"),
    (dict(sparsity=0.5, criterion="gradient", data=[]), pk.MissingDataError, "empty"),
    (
        dict(allocation={"conv": 0.5}, include_output=True),
        pk.PruningError,
        r"missing \['depthwise', 'up', 'head'\]",
    ),
    (
        dict(allocation={"conv": 1.5, "depthwise": 0, "up": 0, "head": 0}),
        pk.InvalidSparsityError,
        r"allocation\['conv'\]=1\.5",
    ),
    (dict(sparsity=0.5, min_keep=-1), pk.PruningError, "min_keep=-1"),
    (dict(sparsity=0.5, criterion=lambda w: w[:1]), pk.PruningError, "returned scores of shape"),
    (dict(sparsity=0.5, criterion=lambda w: w * float("nan")), pk.PruningError, "NaN scores"),
]


@pytest.mark.parametrize("kwargs,error,message", CASES)
def test_bad_input_raises_and_leaves_model_unchanged(model, kwargs, error, message):
    before = snapshot(model)
    with pytest.raises(error, match=message):
        pk.prune(model, **kwargs)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight_is_named(model, bad):
    with torch.no_grad():
        pk.layers.weight_param(model.depthwise)[0, 0, 0, 0] = bad
    before = snapshot(model)
    with pytest.raises(pk.InvalidWeightError, match="layer 'depthwise' has 1 NaN/inf"):
        pk.prune(model, 0.5)
    assert_unchanged(model, before)


def test_weight_of_the_wrong_kind():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].weight = nn.Parameter(torch.ones(2, 4, dtype=torch.int32), requires_grad=False)
    before = snapshot(model)
    with pytest.raises(pk.InvalidWeightError, match=r"layer '1' .* torch.int32"):
        pk.prune(model, 0.5, include_output=True)
    assert_unchanged(model, before)


def test_errors_are_value_errors_too():
    assert issubclass(pk.PruningError, ValueError)


def test_data_driven_failure_midway_leaves_model_unchanged(model):
    def exploding_loss(output, target):
        raise RuntimeError("boom")

    before = snapshot(model)
    with pytest.raises(UserCallbackError, match="exploding_loss' raised RuntimeError: boom"):
        pk.prune(model, 0.5, criterion="taylor", data=batches(), loss_fn=exploding_loss)
    assert_unchanged(model, before)
