"""pk.prune: exact sparsity, local vs global scope, allocation, criteria, composition."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit import selection
from prunekit.allocation import erk_densities
from prunekit.layers import select_layers

GRANULARITIES = ["element", "row", "column", "kernel", "filter", "channel", "block:2x2"]
CRITERIA = ["magnitude", "l1", "l2", "random", "gradient", "taylor"]


def conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 6),
    )


def batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(5, 4, 6, 6, generator=g), torch.randint(0, 6, (5,), generator=g))
        for _ in range(n)
    ]


def group_size(model: nn.Module, name: str, gran: str) -> int:
    layer = next(ly for ly in select_layers(model) if ly.name == name)
    return pk.granularity.parse(gran).grouping(tuple(layer.canonical.shape)).group_size


@settings(max_examples=40, deadline=None)
@given(
    gran=st.sampled_from(GRANULARITIES),
    crit=st.sampled_from(CRITERIA),
    sparsity=st.floats(0.0, 0.95),
    scope=st.sampled_from(["local", "global"]),
)
def test_achieved_sparsity_is_exact_up_to_one_group(gran, crit, sparsity, scope):
    model = conv_model()
    # min_keep=0: the floor of one group per layer may legitimately clamp high targets.
    report = pk.prune(
        model, sparsity, granularity=gran, criterion=crit, scope=scope, data=batches(), min_keep=0
    )
    stats = pk.sparsity(model)
    pruned = {r.name for r in report.layers}
    if scope == "local":
        for row in stats.layers:
            if row.name in pruned:
                size = group_size(model, row.name, gran)
                assert abs(row.zeros - round(sparsity * row.numel)) <= size
    else:
        total = sum(r.numel for r in stats.layers if r.name in pruned)
        zeros = sum(r.zeros for r in stats.layers if r.name in pruned)
        biggest = max(group_size(model, n, gran) for n in pruned)
        assert abs(zeros - round(sparsity * total)) <= biggest
    assert report.sparsity == pytest.approx(
        sum(r.zeros for r in stats.layers if r.name in pruned)
        / sum(r.numel for r in stats.layers if r.name in pruned)
    )


def test_element_sparsity_is_exact(mlp):
    pk.prune(mlp, 0.37)
    for row in pk.sparsity(mlp).layers:
        assert row.zeros == round(0.37 * row.numel)


def test_local_prunes_each_layer_to_its_own_threshold(mlp):
    pk.prune(mlp, 0.5, scope="local")
    assert all(r.sparsity == pytest.approx(0.5, abs=1e-3) for r in pk.sparsity(mlp).layers)


def test_global_uses_one_threshold_across_layers(mlp):
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    original = [m.weight.detach().abs().clone() for m in linears]
    pk.prune(mlp, 0.6, scope="global", include_output=True)
    pairs = list(zip(original, linears, strict=True))
    kept_min = min(o[m.weight != 0].min() for o, m in pairs)
    pruned_max = max(o[m.weight == 0].max() for o, m in pairs)
    assert pruned_max <= kept_min
    per_layer = [r.sparsity for r in pk.sparsity(mlp, include_output=True).layers]
    assert max(per_layer) - min(per_layer) > 0.01  # layers end at different sparsities
    assert pk.sparsity(mlp, include_output=True).total == pytest.approx(0.6, abs=1e-4)


def test_global_never_empties_a_layer_unless_asked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 10))
    with torch.no_grad():
        model[1].weight.mul_(1e-4)
    report = pk.prune(model, 0.95, scope="global", include_output=True)
    assert int((model[1].weight != 0).sum()) == 1  # min_keep=1 group survives
    assert pk.sparsity(model, include_output=True).zeros == round(0.95 * (64 * 32 + 320))
    assert report.layers[1].after == pytest.approx(319 / 320)
    model2 = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 10))
    with torch.no_grad():
        model2[1].weight.mul_(1e-4)
    pk.prune(model2, 0.95, scope="global", min_keep=0, include_output=True)
    assert int((model2[1].weight != 0).sum()) == 0


def test_sampled_large_pool_path_matches_exact_selection(monkeypatch):
    """With a tiny sample the bracket path (and its fallback) must give the exact mask."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.Linear(200, 100))
    reference = [m.weight.detach().abs().flatten() for m in model]
    allw = torch.cat(reference)
    k = round(0.8 * allw.numel())
    threshold = allw.sort().values[k - 1]
    for sample_size in (64, 4096):
        m = nn.Sequential(nn.Linear(300, 200), nn.Linear(200, 100))
        m.load_state_dict(model.state_dict())
        monkeypatch.setattr(selection, "SAMPLE_SIZE", sample_size)
        monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 1 << 12)
        pk.prune(m, 0.8, scope="global", include_output=True)
        assert pk.sparsity(m, include_output=True).zeros == k
        for ref, layer in zip(reference, m, strict=True):
            assert torch.equal(layer.weight.detach().flatten() == 0, ref <= threshold)


def test_ties_are_broken_by_position():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    pk.prune(lin, 0.5)
    assert (lin.weight.detach().flatten() == 0).tolist() == [True] * 4 + [False] * 4


def test_sparsity_composes_and_never_shrinks(mlp):
    pk.prune(mlp, 0.5)
    first = [(m.weight == 0).clone() for m in mlp if isinstance(m, nn.Linear)]
    pk.prune(mlp, 0.9)
    stats = pk.sparsity(mlp)
    for row in stats.layers:
        assert row.zeros == round(0.9 * row.numel)
    for before, m in zip(first, [m for m in mlp if isinstance(m, nn.Linear)], strict=True):
        assert (m.weight == 0)[before].all()
    pk.prune(mlp, 0.3)  # a lower target changes nothing
    assert pk.sparsity(mlp).zeros == stats.zeros


def test_erk_allocation_matches_formula_and_budget():
    model = conv_model()
    layers = select_layers(model)
    dens = erk_densities(layers, 0.8)
    numel = {ly.name: ly.weight.numel() for ly in layers}
    assert sum(dens[n] * numel[n] for n in dens) == pytest.approx(0.2 * sum(numel.values()))
    raw = {ly.name: sum(ly.canonical.shape) / ly.weight.numel() for ly in layers}
    free = [n for n in dens if dens[n] < 1]
    ratios = [dens[n] / raw[n] for n in free]
    assert max(ratios) == pytest.approx(min(ratios))
    report = pk.prune(model, 0.8, allocation="erk")
    assert report.sparsity == pytest.approx(0.8, abs=2e-3)
    assert len({round(r.after, 3) for r in report.layers}) > 1


def test_explicit_allocation(mlp):
    alloc = {"0": 0.25, "2": 0.5, "4": 0.75}
    pk.prune(mlp, allocation=alloc, include_output=True)
    got = pk.sparsity(mlp, include_output=True).to_dict()
    for name, s in alloc.items():
        assert got[name] == pytest.approx(s, abs=1e-3)


def test_gradient_is_accumulated_over_all_batches():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(3)]
    total = torch.zeros(3, 6)
    for x, y in data:
        total += torch.autograd.grad(nn.functional.cross_entropy(lin(x), y), lin.weight)[0].abs()
    crit = pk.criteria.Gradient()
    layers = select_layers(lin)
    grouping = pk.granularity.parse("element").grouping((3, 6))
    units = pk.criteria.units.LayerUnits(lin, layers, {"": grouping})
    stats = crit.prepare(lin, units, pk.inputs.Calibration(data))
    assert torch.allclose(stats[""], total / 3)
    pk.prune(lin, 0.5, criterion="gradient", data=data)
    kept = lin.weight.detach() != 0
    assert total[kept].min() >= total[~kept].max()


def test_taylor_group_score_is_squared_sum():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    data = [(torch.randn(8, 6), torch.randint(0, 4, (8,)))]
    x, y = data[0]
    g = torch.autograd.grad(nn.functional.cross_entropy(lin(x), y), lin.weight)[0]
    expected = (lin.weight.detach() * g).sum(1) ** 2
    pk.prune(lin, 0.5, granularity="row", criterion="taylor", data=data)
    kept_rows = (lin.weight.detach() != 0).any(1)
    assert set(kept_rows.nonzero().flatten().tolist()) == set(expected.topk(2).indices.tolist())


def test_data_collection_leaves_model_state_alone(convnet):
    convnet.train()
    data = [(torch.randn(2, 4, 4, 4), torch.randint(0, 4, (2,)))]
    pk.prune(convnet, 0.5, criterion="taylor", data=data)
    assert convnet.training
    assert all(p.grad is None for p in convnet.parameters())


def test_random_criterion_is_seeded(mlp):
    import copy

    a, b = copy.deepcopy(mlp), copy.deepcopy(mlp)
    pk.prune(a, 0.5, criterion="random", seed=3)
    pk.prune(b, 0.5, criterion="random", seed=3)
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)
    c = copy.deepcopy(mlp)
    pk.prune(c, 0.5, criterion="random", seed=4)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_custom_criterion_function_and_class(mlp):
    pk.prune(mlp, 0.5, criterion=lambda w: -w.abs())  # keeps the *smallest* weights
    w = mlp[0].parametrizations.weight.original.detach().abs()
    kept = mlp[0].weight.detach() != 0
    assert w[kept].max() <= w[~kept].min()

    class Cube(pk.criteria.Criterion):
        name = "cube"

        def group_scores(self, weight, grouping, ctx):
            return grouping.groups(weight.abs() ** 3).sum(-1)

    model = conv_model()
    report = pk.prune(model, 0.5, granularity="filter", criterion=Cube())
    assert report.criterion == "cube"


def test_layer_types_coverage(convnet):
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(12, 8)  # weight (in=8, out=12)
    emb = nn.Embedding(20, 8)
    conv3 = nn.Conv3d(4, 4, 2)
    model = nn.ModuleDict({"net": convnet, "c1d": conv1d, "emb": emb, "c3": conv3})
    report = pk.prune(model, 0.5, include_output=True, include_embeddings=True)
    assert {r.kind for r in report.layers} == {
        "Conv2d",
        "ConvTranspose2d",
        "Linear",
        "Conv1D",
        "Embedding",
        "Conv3d",
    }
    pk.prune(conv1d, granularity="2:4")
    # Conv1D groups run along its input axis, dim 0 of the stored (in, out) weight.
    assert ((conv1d.weight.detach() != 0).reshape(2, 4, 12).sum(1) <= 2).all()


def test_selection_by_pattern_type_predicate_and_exclude(convnet):
    assert [r.name for r in pk.prune(convnet, 0.1, layers="conv*").layers] == ["conv"]
    head = pk.prune(convnet, 0.1, layers=nn.Linear, include_output=True)
    assert [r.name for r in head.layers] == ["head"]
    names = [r.name for r in pk.prune(convnet, 0.1, exclude=["head", nn.ConvTranspose2d]).layers]
    assert names == ["conv", "depthwise"]
    pred = pk.prune(convnet, 0.1, layers=lambda n, m: n.startswith("d")).layers
    assert [r.name for r in pred] == ["depthwise"]


def test_incompatible_layers_are_skipped_by_default_and_reported(convnet):
    report = pk.prune(convnet, 0.5, granularity="kernel", include_output=True)
    assert [r.name for r in report.layers] == ["conv", "depthwise", "up"]
    assert report.skipped and report.skipped[0][0] == "head"
    assert "skipped" in str(report)


def test_report_table_lists_every_layer(mlp):
    text = " ".join(str(pk.prune(mlp, 0.5, scope="global")).split())
    assert "achieved 50.00%" in text and "Linear" in text


def test_zero_sparsity_is_a_no_op_mask(mlp):
    pk.prune(mlp, 0.0)
    assert pk.sparsity(mlp).zeros == 0
    assert math.isclose(pk.sparsity(mlp).total, 0.0)


@pytest.mark.parametrize(
    "name", ["lenet300", "lenet5", "vgg", "resnet20", "mobilenetv2", "vit", "gpt"]
)
@pytest.mark.parametrize("gran", ["element", "2:4", "filter", "kernel"])
def test_every_zoo_model_prunes_and_still_runs(name, gran):
    from prunekit.zoo import build_model, example_input

    torch.manual_seed(0)
    model = build_model(name)
    sparsity = None if gran == "2:4" else 0.5
    if gran == "kernel" and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        with pytest.raises(pk.NoLayersError, match="has no kernel"):
            pk.prune(model, sparsity, granularity=gran)
        return
    report = pk.prune(model, sparsity, granularity=gran)
    assert report.layers and report.sparsity > 0.3
    out = model(example_input(name, 2))
    assert torch.isfinite(out).all()
