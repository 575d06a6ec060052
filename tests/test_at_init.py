"""Pruning at initialisation: SNIP, GraSP, SynFlow and the shuffle / re-init controls."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import prunekit as pk
from prunekit.criteria import GraSP, SynFlow
from prunekit.training.at_init import reinitialize, shuffle_masks, synflow_prune
from prunekit.zoo import build_model


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def _lenet5() -> nn.Module:
    torch.manual_seed(0)
    return build_model("lenet5")


def _data() -> list:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen))]


def test_snip_is_abs_w_times_grad() -> None:
    model, data = _mlp(), _data()
    x, y = data[0]
    loss = nn.functional.cross_entropy(model(x), y)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    grads = torch.autograd.grad(loss, [m.weight for m in linears])
    scores = torch.cat(
        [(m.weight * g).abs().flatten() for m, g in zip(linears, grads, strict=True)]
    )
    pk.prune(model, 0.75, criterion="snip", scope="global", data=data, include_output=True)
    kept = torch.cat([pk.masks.get_mask(m).flatten() for m in model if isinstance(m, nn.Linear)])
    threshold = scores.sort().values[math.floor(0.75 * scores.numel())]
    assert bool((scores[kept] >= threshold).all()) and int(kept.sum()) == scores.numel() // 4


def test_grasp_is_w_times_hessian_gradient() -> None:
    model, data = _mlp(), _data()
    x, y = data[0]
    params = [m.weight for m in model if isinstance(m, nn.Linear)]
    g = torch.autograd.grad(nn.functional.cross_entropy(model(x) / 200, y), params,
                            create_graph=True)  # fmt: skip
    hg = torch.autograd.grad(sum((gi * gi.detach()).sum() for gi in g), params)
    layers = pk.layers.select_layers(model)
    groupings = {ly.name: pk.granularity.Element().grouping(tuple(ly.canonical.shape))
                 for ly in layers}  # fmt: skip
    units = pk.criteria.units.LayerUnits(model, layers, groupings)
    cal = pk.inputs.Calibration(data, loss_fn=nn.functional.cross_entropy)
    stats = GraSP().prepare(model, units, cal)
    for layer, w, h in zip(layers, params, hg, strict=True):
        want = (w * h).detach()
        assert torch.allclose(stats[layer.name].view_as(want), want, rtol=1e-4, atol=1e-12)


def test_synflow_is_data_free_and_iterative() -> None:
    model = build_model("lenet5")
    x = torch.randn(2, 1, 28, 28)
    report = synflow_prune(model, 0.9, x, rounds=10)
    assert pk.sparsity(model).total == pytest.approx(0.9, abs=1e-3)
    assert all(r.after < 1.0 for r in report.layers)  # no layer collapses (synflow's point)
    # the input values never matter, only the shape
    a, b = _lenet5(), _lenet5()
    pk.prune(a, 0.5, criterion=SynFlow(), scope="global", data=[torch.randn(2, 1, 28, 28)])
    pk.prune(b, 0.5, criterion="synflow", scope="global", data=[torch.zeros(2, 1, 28, 28)])
    pairs = [(m, n) for m, n in zip(a.modules(), b.modules(), strict=True)
             if pk.masks.get_mask(m) is not None]  # fmt: skip
    assert pairs and all(torch.equal(pk.masks.get_mask(m), pk.masks.get_mask(n)) for m, n in pairs)


def test_controls_keep_densities_and_masks() -> None:
    model, data = _mlp(), _data()
    pk.prune(model, 0.8, criterion="snip", scope="global", data=data)
    before = {n: pk.masks.get_mask(m).clone() for n, m in model.named_modules()
              if pk.masks.get_mask(m) is not None}  # fmt: skip
    shuffle_masks(model, seed=1)
    for name, mask in before.items():
        new = pk.masks.get_mask(model.get_submodule(name))
        assert int(new.sum()) == int(mask.sum()) and not torch.equal(new, mask)
    masks = {n: pk.masks.get_mask(model.get_submodule(n)).clone() for n in before}
    weights = {n: pk.layers.weight_param(model.get_submodule(n)).detach().clone() for n in before}
    reinitialize(model, seed=2)
    for name in before:
        module = model.get_submodule(name)
        assert torch.equal(pk.masks.get_mask(module), masks[name])
        assert not torch.equal(pk.layers.weight_param(module), weights[name])
        assert bool((module.weight[~masks[name]] == 0).all())


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: pk.prune(m, 0.5, criterion="synflow"), pk.MissingDataError, "'synflow'"),
        (lambda m: pk.prune(m, 0.5, criterion="snip"), pk.MissingDataError, "'snip' needs"),
        (lambda m: pk.prune(m, 0.5, criterion="grasp"), pk.MissingDataError, "'grasp' needs"),
        (lambda m: synflow_prune(m, 0.5, torch.randn(1, 8), rounds=0), pk.PruningError,
         "rounds=0"),
        (lambda m: synflow_prune(m, 0.5, torch.randn(1, 8), rounds=True), pk.PruningError,
         r"rounds=True must be an int >= 1"),
        (lambda m: synflow_prune(m, 1.0, torch.randn(1, 8)), pk.InvalidSparsityError, "1.0"),
        (shuffle_masks, pk.PruningError, "no masks"),
        (reinitialize, pk.PruningError, "no masks"),
    ],
)  # fmt: skip
def test_bad_input_leaves_the_model_unchanged(call, error, match) -> None:
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    assert_unchanged(model, before)
