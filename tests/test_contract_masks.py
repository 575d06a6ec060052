"""The contract suite of masks (like scikit-learn's ``check_estimator``): every registered
criterion that scores weight groups, under every granularity, goes through the same checks
on one model holding every prunable layer type. The parametrization is read from the
registries, so a new criterion or granularity joins the suite by being registered.

Checks: exact counts (element) or within one group (others), N:M exactly N of every M
(and per column for 2-D N:M), every group all kept or all pruned, the same masks from the
same call on a fresh model, incompatible layers reported (skipped or refused, never
silently ignored), and the model untouched by a call that fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ConvNet, assert_unchanged, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import prunekit as pk
from prunekit import criteria, granularity
from prunekit.criteria.base import UNIT_KINDS
from prunekit.errors import (
    IncompatibleLayerError,
    InvalidSparsityError,
    MissingDataError,
    NoLayersError,
    PruningError,
    UnknownChoiceError,
)
from prunekit.granularity import NM, NM2D, Granularity
from prunekit.layers import SUPPORTED_TYPES, is_prunable, select_layers, to_canonical
from prunekit.masks import get_mask

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional: GPT-2's Conv1D layer is then not covered
    Conv1D = None

pytestmark = pytest.mark.usefixtures("one_thread")
GROUPS = criteria.names("groups")
GRANULARITIES = [*granularity._FIXED, "2:4", "4:8", "2:4-2d", "block:2x2"]
FRACTIONAL = [g for g in GRANULARITIES if not isinstance(granularity.parse(g), NM)]


class AllLayers(ConvNet):
    """The conftest ConvNet (Conv2d, depthwise Conv2d, ConvTranspose2d, Linear) plus Conv1d,
    Conv3d, Embedding and GPT-2's Conv1D: every layer type prunekit prunes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.conv3d = nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1))
        self.embed = nn.Embedding(8, 8)
        self.gpt = Conv1D(8, 8) if Conv1D is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.depthwise(torch.relu(self.conv(x))))
        h = F.avg_pool2d(self.up(h), 4)  # (B, 8, 4, 4)
        h = torch.relu(self.conv1d(h.flatten(2)))
        h = self.conv3d(h.view(-1, 8, 1, 4, 4)).mean((2, 3, 4))
        h = h @ self.embed(torch.arange(8, device=h.device))
        return self.head(torch.relu(self.gpt(h)))


def model() -> nn.Module:
    torch.manual_seed(0)
    return AllLayers()


_gen = torch.Generator().manual_seed(1)
DATA = [(torch.randn(8, 4, 8, 8, generator=_gen), torch.randint(0, 4, (8,), generator=_gen))]
EVERY = {"include_output": True, "include_embeddings": True}  # every layer type is pruned


def _subclasses(cls: type) -> set[type]:
    return {s for c in cls.__subclasses__() for s in {c, *_subclasses(c)}}


def test_suite_covers_every_registered_criterion_granularity_and_layer_type() -> None:
    for name, cls in criteria.REGISTRY.items():
        assert cls.name == name and cls.units and cls.units <= UNIT_KINDS, name
        assert isinstance(criteria.get(name), cls)
        for kind in UNIT_KINDS - cls.units:  # an engine it does not declare refuses it
            with pytest.raises(UnknownChoiceError):
                criteria.get(name, units=kind)
    covered = {n for kind in UNIT_KINDS for n in criteria.names(kind)}
    assert covered == set(criteria.REGISTRY)
    assert sorted(n for n, c in criteria.REGISTRY.items() if "groups" in c.units) == GROUPS
    parsed = [granularity.parse(g) for g in GRANULARITIES]
    assert [g.name for g in parsed] == GRANULARITIES
    ours = {c for c in _subclasses(Granularity) if c.__module__.startswith("prunekit.")}
    assert {type(g) for g in parsed} == ours  # every kind of granularity prunekit defines
    kinds = {type(m) for m in model().modules() if is_prunable(m)}
    assert set(SUPPORTED_TYPES) <= kinds


@pytest.mark.parametrize("name", sorted(set(criteria.REGISTRY) - set(GROUPS)))
def test_masks_refuse_a_criterion_that_does_not_score_groups(name: str) -> None:
    net = model()
    before = snapshot(net)
    with pytest.raises(UnknownChoiceError, match=r"pk\.prune"):
        pk.prune(net, 0.5, criterion=name, data=DATA)
    assert_unchanged(net, before)


def _incompatible(net: nn.Module, gran: Granularity, crit: criteria.Criterion):
    """``({layer: reason} the granularity declares, {layer: reason} the criterion declares
    among the others)``."""
    layers = select_layers(net)
    by_gran = {ly.name: r for ly in layers if (r := gran.incompatibility(ly)) is not None}
    rest = [ly for ly in layers if ly.name not in by_gran]
    by_crit = {ly.name: r for ly in rest if (r := crit.incompatibility(ly)) is not None}
    return by_gran, by_crit


def _usable(net: nn.Module, gran: Granularity, crit: criteria.Criterion) -> list[str]:
    """The layers both the granularity and the criterion take."""
    by_gran, by_crit = _incompatible(net, gran, crit)
    return [ly.name for ly in select_layers(net) if ly.name not in {**by_gran, **by_crit}]


def _refused(net: nn.Module, error: type | tuple[type, ...], sparsity, **kwargs) -> None:
    before = snapshot(net)
    with pytest.raises(error):
        pk.prune(net, sparsity, **kwargs)
    assert_unchanged(net, before)


def check_masks(net: nn.Module, gran: Granularity, report: pk.PruneReport, sparsity) -> None:
    """Every pruned layer: a bool mask, whole groups, the exact count (or N:M pattern)."""
    for result in report.layers:
        module = net.get_submodule(result.name)
        mask = get_mask(module)
        assert mask is not None and mask.dtype == torch.bool, result.name
        assert not module.weight[~mask].any()  # the model computes with the masked weight
        keep = to_canonical(module, mask)
        groups = gran.grouping(tuple(keep.shape)).groups(keep)
        assert torch.equal(groups.all(-1), groups.any(-1)), f"{result.name}: a split group"
        if isinstance(gran, NM):
            per_row = keep.movedim(1, -1).reshape(-1, gran.m).sum(-1)
            assert (per_row == gran.n).all(), f"{result.name}: not {gran.name}"
            if isinstance(gran, NM2D):  # and N of every M outputs of each input (W^T)
                per_col = keep.movedim(0, -1).reshape(-1, gran.m).sum(-1)
                assert (per_col == gran.n).all(), f"{result.name}: not {gran.name}"
        else:  # exact up to one group (element: exact); min_keep=1 group stays (default)
            size = groups.shape[-1]
            goal = min(round(sparsity * mask.numel()), mask.numel() - size)
            miss = abs(mask.numel() - int(mask.sum()) - goal)
            assert miss < size, f"{result.name}: {miss} weights off target"


def _masks(net: nn.Module) -> dict[str, Tensor | None]:
    return {ly.name: get_mask(ly.module) for ly in select_layers(net)}


@pytest.mark.parametrize("gran_name", GRANULARITIES)
@pytest.mark.parametrize("crit_name", GROUPS)
def test_masks_contract(crit_name: str, gran_name: str) -> None:
    gran, crit = granularity.parse(gran_name), criteria.get(crit_name, units="groups")
    net = model()
    by_gran, by_crit = _incompatible(net, gran, crit)
    sparsity = None if isinstance(gran, NM) else 0.3
    call = {"granularity": gran_name, "criterion": crit_name, "data": DATA, **EVERY}
    for name in by_gran:  # an incompatible layer named explicitly is refused
        _refused(net, IncompatibleLayerError, sparsity, layers=[name], **call)
    usable = _usable(net, gran, crit)
    if by_crit or not usable:  # the criterion's refusal is never silently skipped
        _refused(net, (IncompatibleLayerError, NoLayersError), sparsity, **call)
    if not usable:
        pytest.skip(f"no layer takes {crit_name} x {gran_name} ({by_gran | by_crit})")
    layers = usable if by_crit else None
    report = pk.prune(net, sparsity, layers=layers, **call)
    assert [r.name for r in report.layers] == usable
    assert dict(report.skipped) == ({} if by_crit else by_gran)
    assert all(get_mask(net.get_submodule(n)) is None for n in {**by_gran, **by_crit})
    check_masks(net, gran, report, sparsity)
    twin = model()  # deterministic: the same call on a fresh copy gives the same masks
    pk.prune(twin, sparsity, layers=layers, **call)
    for name, mask in _masks(net).items():
        other = _masks(twin)[name]
        assert (mask is None and other is None) or torch.equal(mask, other), name


@pytest.mark.parametrize("gran_name", GRANULARITIES)
@pytest.mark.parametrize("crit_name", GROUPS)
def test_bad_input_leaves_the_model_unchanged(crit_name: str, gran_name: str) -> None:
    gran, crit = granularity.parse(gran_name), criteria.get(crit_name)
    net = model()
    pk.prune(net, 0.3, **EVERY)  # masks already in place must survive a failed call too
    layers = _usable(net, gran, crit)
    if not layers:
        pytest.skip(f"no layer takes {crit_name} x {gran_name} (test_masks_contract checks why)")
    call = {"granularity": gran_name, "criterion": crit_name, "layers": layers, **EVERY}
    valid = None if isinstance(gran, NM) else 0.5  # the sparsity that would be accepted
    _refused(net, InvalidSparsityError, 1.5, data=DATA, **call)
    _refused(net, NoLayersError, valid, data=DATA, **{**call, "layers": ["no_such_layer"]})
    _refused(net, PruningError, valid, data=DATA, scop="global", **call)
    if crit.requires_data:
        _refused(net, MissingDataError, valid, **call)


@pytest.mark.parametrize("crit_name", GROUPS)
@settings(max_examples=8, deadline=None)
@given(sparsity=st.floats(0.0, 0.95), gran_name=st.sampled_from(FRACTIONAL))
def test_counts_are_exact_at_any_sparsity(crit_name: str, sparsity: float, gran_name: str) -> None:
    gran, crit = granularity.parse(gran_name), criteria.get(crit_name)
    net = model()
    layers = _usable(net, gran, crit)
    if layers:  # (wanda x kernel takes none: test_masks_contract checks it is refused)
        call = {"granularity": gran_name, "criterion": crit_name, "layers": layers, **EVERY}
        check_masks(net, gran, pk.prune(net, sparsity, data=DATA, **call), sparsity)


def test_group_counts_round_to_the_nearest_whole_group() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 8)  # 8 rows of 3: 0.3 * 24 = 7.2 -> 6 pruned (off 1), not 9 (off 2)
    pk.prune(layer, 0.3, granularity="row")
    assert int((~get_mask(layer)).sum()) == 6


def test_scores_that_move_between_passes_are_refused_not_misapplied() -> None:
    """The streamed selection scores twice; a criterion whose scores drift (global RNG,
    state) must be an error naming the fix, never a wrong mask or an IndexError."""

    class Drift(pk.criteria.Criterion):
        name = "drift"

        def __init__(self) -> None:
            self.calls = 0

        def scores(self, units, ctx):
            shift = (0.0, 10.0, -10.0)[min(self.calls, 2)]
            self.calls += 1
            return torch.rand(units.shape, generator=torch.Generator().manual_seed(1)) + shift

    layer = nn.Linear(16, 16)
    with pytest.raises(pk.PruningError, match=r"ctx\.generator"):
        pk.prune(layer, 0.5, criterion=Drift())
    assert get_mask(layer) is None
