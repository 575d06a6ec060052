"""The contract suite of the two other engines (like scikit-learn's ``check_estimator``):
every criterion that scores channel groups goes through :func:`prunekit.shrink`, every
LLM method (the row criteria and SparseGPT) through :func:`prunekit.llm.prune`, with the
same checks: exact counts, the same result from the same call on a fresh model, and the
model untouched by a call that fails. Both lists are read from the registry, so a new
criterion joins by being registered.

Then a toy criterion defined here, in a few lines and registered nowhere, runs through
masks, shrink and the LLM engine, and each keeps what an independent computation of its
scores (``sum |w|^3`` per unit) says it should.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_unchanged, snapshot, tiny_llama
from structured_models import randomize_norms
from torch import Tensor, nn

import prunekit as pk
from prunekit import criteria, granularity
from prunekit.errors import InvalidSparsityError, MissingDataError, UnknownChoiceError
from prunekit.layers import to_canonical, weight_param
from prunekit.llm.methods import ALPS_NAME, LAYER_WIDE, SPARSEGPT, methods
from prunekit.masks import get_mask

pytestmark = pytest.mark.usefixtures("one_thread")
CHANNELS = criteria.names("channels")
ROWS = criteria.names("rows")
METHODS = methods()


class BNNet(nn.Module):
    """conv-BN, conv-BN, Linear, Linear: three channel families, two with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


FAMILIES = {  # each family's members (parameter, channel dim), written out by hand
    "conv1": [("conv1.weight", 0), ("conv1.bias", 0), ("bn1.weight", 0), ("bn1.bias", 0),
              ("conv2.weight", 1)],
    "conv2": [("conv2.weight", 0), ("conv2.bias", 0), ("bn2.weight", 0), ("bn2.bias", 0),
              ("fc1.weight", 1)],
    "fc1": [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)],
}  # fmt: skip
WITH_BATCHNORM = {"conv1", "conv2"}


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(BNNet()).eval()


_gen = torch.Generator().manual_seed(1)
X = torch.randn(8, 3, 8, 8, generator=_gen)
DATA = [(X, torch.randint(0, 4, (8,), generator=_gen))]


def _same_state(a: nn.Module, b: nn.Module) -> None:
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


@pytest.mark.parametrize("name", CHANNELS)
def test_shrink_contract(name: str) -> None:
    net = bn_net()
    report = pk.shrink(net, X, ratio=0.5, criterion=name, data=DATA)  # verifies vs masked
    assert [f.name for f in report.families] == list(FAMILIES)
    for f in report.families:  # local: floor(ratio * total) groups of every ranked family go
        if f.note:  # a family the criterion cannot rank is left whole, and said so
            assert f.removed == () and f.name not in WITH_BATCHNORM, f
        else:
            assert len(f.removed) == math.floor(0.5 * f.total), f
    assert report.params_after < report.params_before
    with torch.no_grad():
        assert net(X).shape == (8, 4)
    twin = bn_net()  # deterministic: the same call on a fresh copy gives the same model
    assert pk.shrink(twin, X, ratio=0.5, criterion=name, data=DATA).families == report.families
    _same_state(net, twin)


@pytest.mark.parametrize("name", CHANNELS)
def test_shrink_bad_input_leaves_the_model_unchanged(name: str) -> None:
    net = bn_net()
    before = snapshot(net)
    with pytest.raises(InvalidSparsityError):
        pk.shrink(net, X, ratio=2, criterion=name, data=DATA)
    assert_unchanged(net, before)
    if criteria.get(name).requires_data:
        with pytest.raises(MissingDataError):
            pk.shrink(net, X, ratio=0.5, criterion=name)
        assert_unchanged(net, before)


@pytest.mark.parametrize("name", sorted(set(criteria.REGISTRY) - set(CHANNELS)))
def test_shrink_refuses_a_criterion_that_does_not_score_channels(name: str) -> None:
    net = bn_net()
    before = snapshot(net)
    with pytest.raises(UnknownChoiceError, match=r"pk\.shrink"):
        pk.shrink(net, X, ratio=0.5, criterion=name, data=DATA)
    assert_unchanged(net, before)


VOCAB = 64
IDS = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))


def _block_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}


def _check_rows(model: nn.Module, method: str, sparsity: float | str) -> None:
    """Exact counts: N of every M, per row (row criteria) or per layer (layer-wide methods,
    SparseGPT and ALPS)."""
    for name, module in _block_linears(model).items():
        keep = to_canonical(module, get_mask(module))
        if isinstance(sparsity, str):
            nm = granularity.parse(sparsity)
            assert (keep.reshape(-1, nm.m).sum(-1) == nm.n).all(), name
        elif method not in (*LAYER_WIDE, SPARSEGPT, ALPS_NAME):
            width = keep.shape[1]
            assert (keep.sum(1) == width - round(sparsity * width)).all(), name
        else:
            assert int(keep.sum()) == keep.numel() - round(sparsity * keep.numel()), name
    assert get_mask(model.lm_head) is None and get_mask(model.model.embed_tokens) is None


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
@pytest.mark.parametrize("method", METHODS)
def test_llm_contract(method: str, sparsity: float | str) -> None:
    model = tiny_llama()
    pk.llm.prune(model, IDS, method=method, sparsity=sparsity, progress=False, keep_masks=True)
    _check_rows(model, method, sparsity)
    twin = tiny_llama()  # deterministic: masks and (SparseGPT) updated weights
    pk.llm.prune(twin, IDS, method=method, sparsity=sparsity, progress=False, keep_masks=True)
    _same_state(model, twin)


@pytest.mark.parametrize("method", METHODS)
def test_llm_bad_input_leaves_the_model_unchanged(method: str) -> None:
    model = tiny_llama()
    before = snapshot(model)
    for bad in ({"sparsity": 1.5}, {"sparsity": "2:4-2d"}, {"allocation": "nope"}):
        with pytest.raises(pk.errors.PruningError):
            pk.llm.prune(model, IDS, method=method, progress=False, **bad)
        assert_unchanged(model, before)


@pytest.mark.parametrize("name", sorted(set(criteria.REGISTRY) - set(ROWS)))
def test_llm_refuses_a_criterion_that_does_not_score_rows(name: str) -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(UnknownChoiceError, match="method"):
        pk.llm.prune(model, IDS, method=name, progress=False)
    assert_unchanged(model, before)


class Cube(pk.criteria.Criterion):
    """A toy criterion, registered nowhere: ``sum |w|^3`` over each unit."""

    name = "cube"

    def scores(self, units, ctx):
        return units.sum(lambda w, g: w.abs() ** 3)


def _lowest_pruned(scores: Tensor, keep: Tensor) -> bool:
    """Every pruned score is below every kept one, along the last axis."""
    pruned = scores.masked_fill(keep, -math.inf).amax(-1)
    return bool((pruned < scores.masked_fill(~keep, math.inf).amin(-1)).all())


def _cube_masks() -> None:
    net = bn_net()
    pk.prune(net, 0.3, criterion=Cube(), granularity="filter", include_output=True)
    for layer in (net.conv1, net.conv2, net.fc1, net.fc2):
        keep = to_canonical(layer, get_mask(layer)).flatten(1)
        assert (keep.all(1) | ~keep.any(1)).all()
        assert _lowest_pruned(weight_param(layer).abs().pow(3).flatten(1).sum(1), keep[:, 0])
    net = bn_net()
    pk.prune(net, granularity="2:4", criterion=Cube(), layers=["conv2", "fc1", "fc2"],
             include_output=True)  # fmt: skip
    for layer in (net.conv2, net.fc1, net.fc2):
        keep = to_canonical(layer, get_mask(layer)).movedim(1, -1).reshape(-1, 4)
        cube = to_canonical(layer, weight_param(layer)).abs().pow(3).movedim(1, -1)
        assert _lowest_pruned(cube.reshape(-1, 4), keep) and (keep.sum(1) == 2).all()


def _cube_shrink() -> None:
    net = bn_net()
    params = dict(net.named_parameters())
    expected = {}
    for family, members in FAMILIES.items():
        per_channel = [params[p].detach().abs().pow(3).movedim(d, 0) for p, d in members]
        sums = sum(t.reshape(len(t), -1).sum(1) for t in per_channel)
        expected[family] = tuple(sorted(sums.argsort()[: len(sums) // 2].tolist()))
    report = pk.shrink(net, X, ratio=0.5, criterion=Cube())
    assert {f.name: f.removed for f in report.families} == expected


def _cube_llm() -> None:
    for sparsity in (0.5, "2:4"):
        model = tiny_llama()
        pk.llm.prune(model, IDS, method=Cube(), sparsity=sparsity, progress=False, keep_masks=True)
        _check_rows(model, "cube", sparsity)
        for module in _block_linears(model).values():
            cube, keep = weight_param(module).abs().pow(3), get_mask(module)
            if sparsity == "2:4":
                cube, keep = cube.reshape(-1, 4), keep.reshape(-1, 4)
            assert _lowest_pruned(cube, keep)


def test_a_toy_criterion_runs_through_masks_shrink_and_llm() -> None:
    _cube_masks()
    _cube_shrink()
    _cube_llm()
