"""Masks: parametrize-based, trainable, composable, bakeable, saveable, copyable."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit import bits
from prunekit.masks import copy_masks, get_mask


@given(st.lists(st.booleans(), min_size=0, max_size=100))
def test_pack_unpack_round_trip(values):
    mask = torch.tensor(values, dtype=torch.bool)
    packed = bits.pack(mask)
    assert packed.numel() == (len(values) + 7) // 8
    assert torch.equal(bits.unpack(packed, mask.shape), mask)
    assert bits.count_ones(packed) == sum(values)


@given(st.lists(st.booleans(), min_size=1, max_size=64), st.data())
def test_clear_bits(values, data):
    mask = torch.tensor(values, dtype=torch.bool)
    positions = data.draw(st.sets(st.integers(0, len(values) - 1)))
    packed = bits.pack(mask)
    bits.clear(packed, torch.tensor(sorted(positions), dtype=torch.int64))
    expected = mask.clone()
    expected[list(positions)] = False
    assert torch.equal(bits.unpack(packed, mask.shape), expected)


def _train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 32)).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
)
def test_pruned_weights_stay_zero_through_optimizer_steps(mlp, make_opt):
    optimizer = make_opt(mlp.parameters())
    _train_steps(mlp, optimizer)  # momentum / Adam state from before pruning
    pk.prune(mlp, 0.7)
    zeros = [(m.weight == 0).clone() for m in mlp if isinstance(m, nn.Linear)]
    _train_steps(mlp, optimizer)
    for before, m in zip(zeros, [m for m in mlp if isinstance(m, nn.Linear)], strict=True):
        assert (m.weight[before] == 0).all()
        assert (m.weight[~before] != 0).all()  # survivors still train


def test_bake_writes_zeros_and_removes_masks(mlp):
    x = torch.randn(4, 32)
    pk.prune(mlp, 0.8)
    masked_out = mlp(x)
    pk.bake(mlp)
    assert not any(hasattr(m, "parametrizations") for m in mlp.modules())
    assert torch.equal(mlp(x), masked_out)
    assert pk.sparsity(mlp).total == pytest.approx(0.8, abs=1e-3)
    fresh = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8)
    )
    fresh.load_state_dict(mlp.state_dict())  # an ordinary state dict


def test_remove_restores_the_original_weights(mlp):
    original = copy.deepcopy(mlp.state_dict())
    pk.prune(mlp, 0.8)
    pk.masks.remove(mlp)
    for k, v in mlp.state_dict().items():
        assert torch.equal(v, original[k])


def test_masked_state_dict_round_trip(mlp, tmp_path):
    pk.prune(mlp, 0.6, scope="global")
    x = torch.randn(3, 32)
    path = tmp_path / "masked.pt"
    torch.save(mlp.state_dict(), path)
    fresh = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8)
    )
    pk.masks.load_state_dict(fresh, torch.load(path, weights_only=True))
    assert torch.equal(fresh(x), mlp(x))
    assert pk.sparsity(fresh).to_dict() == pk.sparsity(mlp).to_dict()
    # Masks keep working after loading: a further prune composes.
    pk.prune(fresh, 0.9)
    assert pk.sparsity(fresh).total == pytest.approx(0.9, abs=1e-3)


def test_masked_state_dict_into_masked_model(mlp):
    pk.prune(mlp, 0.5)
    other = copy.deepcopy(mlp)
    pk.masks.remove(other)
    pk.prune(other, 0.1, criterion="random")
    pk.masks.load_state_dict(other, mlp.state_dict())
    assert pk.sparsity(other).to_dict() == pk.sparsity(mlp).to_dict()


def test_deepcopy_of_a_masked_model(mlp):
    pk.prune(mlp, 0.5)
    clone = copy.deepcopy(mlp)
    x = torch.randn(2, 32)
    assert torch.equal(clone(x), mlp(x))
    pk.prune(clone, 0.9)
    assert pk.sparsity(mlp).total == pytest.approx(0.5, abs=1e-3)


def test_mask_memory_is_one_bit_per_weight(mlp):
    pk.prune(mlp, 0.5, include_output=True)
    buf = io.BytesIO()
    masks = {k: v for k, v in mlp.state_dict().items() if k.endswith(".packed")}
    torch.save(masks, buf)
    assert sum(v.numel() for v in masks.values()) == sum(
        (m.weight.numel() + 7) // 8 for m in mlp if isinstance(m, nn.Linear)
    )
    assert all(v.dtype == torch.uint8 for v in masks.values())


def test_sparsity_report(mlp):
    pk.prune(mlp, 0.25)
    report = pk.sparsity(mlp, include_output=True)
    assert report["0"] == pytest.approx(0.25, abs=1e-3)
    assert set(report.to_dict()) == {"0", "2", "4", "total"}
    with pytest.raises(KeyError):
        report["nope"]


def test_get_mask_and_apply_mask(mlp):
    assert pk.masks.get_mask(mlp[0]) is None
    mask = torch.rand(64, 32) > 0.5
    pk.masks.apply_mask(mlp[0], mask)
    assert torch.equal(pk.masks.get_mask(mlp[0]), mask)
    with pytest.raises(pk.PruningError, match="does not match"):
        pk.masks.apply_mask(mlp[0], torch.ones(3, 3, dtype=torch.bool))


def test_get_mask_is_bool() -> None:
    layer = nn.Linear(8, 4)
    pk.prune(layer, 0.5)
    mask = pk.masks.get_mask(layer)
    assert mask is not None and mask.dtype == torch.bool
    assert int((~mask).sum()) == 16


def test_copy_masks_copies_masks_by_name() -> None:
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    fresh = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    pk.prune(trained, 0.75, scope="global", include_output=True)
    before = fresh[0].weight.detach().clone()
    copy_masks(trained, fresh)
    for name in ("0", "2"):
        assert torch.equal(
            get_mask(fresh.get_submodule(name)), get_mask(trained.get_submodule(name))
        )
    mask = get_mask(fresh[0])
    assert torch.equal(fresh[0].weight, before * mask)  # fresh weights, trained mask
