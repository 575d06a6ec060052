"""No silent traps (issue 13): a user's parametrizations survive bake/remove, tied weights
stay tied, a selector entry that matches nothing is an error, skipped tensors are reported,
an LLM prune saves and loads as it is, and layers prunekit cannot prune raise a
PruningError naming the layer and the fix, leaving the model unchanged."""

# ruff: noqa: E501  (expected error messages read best unbroken)

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from conftest import assert_unchanged, snapshot
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, spectral_norm

import prunekit as pk
from prunekit.errors import IncompatibleLayerError, InvalidWeightError, NoLayersError, PruningError
from prunekit.masks import WeightMask, get_mask, mask_param

transformers = pytest.importorskip("transformers")
X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def chain(module: nn.Module) -> list[str]:
    return [type(p).__name__ for p in module.parametrizations.weight]


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


# 1. A user's own parametrizations --------------------------------------------------------


@pytest.mark.parametrize("register", [spectral_norm, orthogonal])
def test_remove_drops_only_prunekit_mask(register) -> None:
    torch.manual_seed(0)
    layer = register(nn.Linear(8, 8)).eval()
    dense = run(layer)
    pk.masks.apply_mask(layer, torch.rand(8, 8) > 0.5)  # weight = P(original) * mask
    assert not torch.equal(run(layer), dense)
    pk.masks.remove(layer)
    assert chain(layer) == [register(nn.Linear(2, 2)).parametrizations.weight[0].__class__.__name__]
    torch.testing.assert_close(run(layer), dense, rtol=0, atol=0)


def test_bake_writes_zeros_under_a_parametrization_registered_after_the_mask() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    pk.prune(layer, 0.5)
    spectral_norm(layer).eval()  # weight = SN(original * mask)
    masked = run(layer)
    pk.bake(layer)
    assert chain(layer) == ["_SpectralNorm"]  # the user's parametrization stays
    assert (layer.parametrizations.weight.original == 0).float().mean() == 0.5
    torch.testing.assert_close(run(layer), masked, rtol=0, atol=0)


def test_bake_refuses_a_mask_on_top_of_a_user_parametrization() -> None:
    torch.manual_seed(0)
    layer = orthogonal(nn.Linear(8, 8)).eval()
    pk.masks.apply_mask(layer, torch.rand(8, 8) > 0.5)  # weight = Q(original) * mask
    before = snapshot(layer)
    with pytest.raises(IncompatibleLayerError, match=r"_Orthogonal\(original\) \* mask.*Fix:"):
        pk.bake(layer)
    assert_unchanged(layer, before)
    assert chain(layer) == ["_Orthogonal", "WeightMask"]


def test_masked_state_dict_round_trips_after_a_user_parametrization() -> None:
    def build() -> nn.Module:
        return spectral_norm(nn.Linear(8, 8)).eval()

    torch.manual_seed(0)
    layer = build()
    pk.masks.apply_mask(layer, torch.rand(8, 8) > 0.5)  # the mask is entry 1 of the chain
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    fresh = build()
    pk.masks.load_state_dict(fresh, state)
    assert chain(fresh) == ["_SpectralNorm", "WeightMask"]
    torch.testing.assert_close(run(fresh), run(layer), rtol=0, atol=0)


def test_prune_refuses_or_skips_a_layer_with_a_user_parametrization(mlp) -> None:
    spectral_norm(mlp[2])
    before = snapshot(mlp)
    with pytest.raises(
        IncompatibleLayerError,
        match=r"layer '2': its weight carries .*\(_SpectralNorm\).*Fix: fold",
    ):
        pk.prune(mlp, 0.5, layers=["0", "2"])
    assert_unchanged(mlp, before)
    report = pk.prune(mlp, 0.5, include_output=True)  # every layer asked for: skipped, reported
    assert [r.name for r in report.layers] == ["0", "4"]
    assert report.skipped[0][0] == "2" and report.skipped_numel == 64 * 16
    assert mask_param(mlp[2]) is None and chain(mlp[2]) == ["_SpectralNorm"]


# 2. Tied weights --------------------------------------------------------------------------


class Shared(nn.Module):
    """Two Linear layers holding one Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_shared_parameter_gets_one_mask_and_stays_tied() -> None:
    torch.manual_seed(0)
    model = Shared()
    with pytest.raises(PruningError, match=r"'a' and 'b' share one weight.*exclude=\['b'\]"):
        pk.prune(model, 0.5, include_output=True)
    pk.prune(model, 0.5, exclude=["b"], include_output=True)  # the error message's own fix
    assert mask_param(model.a) is mask_param(model.b)  # one mask, shared
    assert torch.equal(model.a.weight, model.b.weight) and (model.b.weight == 0).sum() == 32
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = Shared()
    pk.masks.load_state_dict(fresh, state)
    assert mask_param(fresh.a) is mask_param(fresh.b)
    torch.testing.assert_close(run(fresh), run(model), rtol=0, atol=0)
    pk.bake(model)
    assert model.a.weight is model.b.weight and (model.b.weight == 0).sum() == 32


def tiny_llama(**config) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **config,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def test_tied_embeddings_share_the_mask_through_prune_and_bake() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    head, embed = model.lm_head, model.model.embed_tokens
    pk.prune(model, 0.5, exclude=["lm_head"], include_output=True, include_embeddings=True)
    assert mask_param(head) is mask_param(embed)
    assert torch.equal(head.weight, embed.weight) and (head.weight == 0).float().mean() == 0.5
    pk.bake(model)
    assert head.weight is embed.weight and (head.weight == 0).float().mean() == 0.5


# 3. Selectors that match nothing, and wrong selector types ---------------------------------


def classifier_net() -> nn.Module:
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 4))
    return nn.Sequential(OrderedDict(features=nn.Linear(8, 8), act=nn.ReLU(), classifier=head))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(exclude=["clasifier.0"]), r"exclude=\['clasifier.0'\]: did you mean 'classifier.0'\?"),
        (dict(exclude=["classifier"]), r"'classifier' is a Sequential, not a prunable layer .*'classifier\.\*'"),
        (dict(layers=["features", "classifier.1"]), r"layers=\['features', 'classifier.1'\] \(entry 'classifier.1'\)"),
        (dict(exclude=nn.Conv2d), r"exclude=<class '.*Conv2d'>: this model has no Conv2d"),
        (dict(exclude=[nn.BatchNorm1d]), r"prunekit does not prune BatchNorm1d layers"),
        (dict(layers=nn.Conv1d), r"layers=<class '.*Conv1d'>: this model has no Conv1d"),
    ],
)  # fmt: skip
def test_selector_entry_matching_nothing_is_an_error(settings, message) -> None:
    model = classifier_net()
    before = snapshot(model)
    with pytest.raises(NoLayersError, match=message):
        pk.prune(model, 0.5, **settings)
    assert_unchanged(model, before)


def test_exclude_predicate_may_match_nothing_and_a_raising_one_is_named() -> None:
    model = classifier_net()
    assert pk.prune(model, 0.5, exclude=lambda name, module: False).sparsity == 0.5

    def picky(name: str, module: nn.Module) -> bool:
        raise KeyError(name)

    before = snapshot(model)
    with pytest.raises(PruningError, match=r"predicate 'picky' raised KeyError") as info:
        pk.prune(model, 0.9, layers=picky)
    assert isinstance(info.value.__cause__, KeyError)
    assert_unchanged(model, before)


@pytest.mark.parametrize("selector", [3, [3], int, {"0": 1}, 0.5, [nn.Linear, None]])
def test_wrong_selector_types_are_pruning_errors(selector) -> None:
    model = classifier_net()
    for settings in (dict(layers=selector), dict(exclude=selector)):
        with pytest.raises(PruningError, match=r"Fix: pass a name or glob pattern"):
            pk.prune(model, 0.5, **settings)
    assert mask_param(model.features) is None


def test_cli_exclude_typo_exits_2_in_one_line(tmp_path: Path, capsys) -> None:
    from prunekit.cli import main

    argv = ["prune", "--model", "lenet300", "--sparsity", "0.5", "--exclude", "fc4",
            "--input-shape", "1,784", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "exclude=['fc4']: did you mean" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# 4. MoE experts stored as 3-D parameters --------------------------------------------------


def tiny_mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config)


def test_moe_experts_are_pruned_by_the_llm_engine_and_reported_elsewhere() -> None:
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_mixtral()
    experts = {n: p.numel() for n, p in model.named_parameters() if ".mlp." in n}
    assert {n.rsplit(".", 1)[-1] for n in experts} == {"weight", "gate_up_proj", "down_proj"}
    routers = {n for n in experts if n.endswith("gate.weight")}
    report = pk.llm.prune(model, ids, sparsity=0.5, progress=False)
    # Fused 3-D experts are pruned expert by expert; only the routers stay dense, and say so.
    assert {n for n, _ in report.skipped} == routers
    assert "MixtralTopKRouter" in dict(report.skipped)["model.layers.0.mlp.gate.weight"]
    fused = dict(model.named_parameters())
    for name in set(experts) - routers:
        for expert in fused[name]:
            assert int((expert == 0).sum()) == expert.numel() // 2, name
    assert "2 tensors in the blocks (256 weights) skipped" in report.summary()
    # The mask engine prunes Linear / Conv weights only: the 3-D experts are reported.
    report = pk.prune(tiny_mixtral(), 0.5, include_output=True, include_embeddings=True)
    assert {n for n, _ in report.skipped} == set(experts)
    assert f"in 10 layers; 6 skipped ({sum(experts.values()):,} weights)" in report.summary()
    chosen = pk.prune(tiny_mixtral(), 0.5, layers="model.*", include_embeddings=True)
    assert chosen.skipped == []  # chose its layers


# 5. The masked-save trap ----------------------------------------------------------------


def test_llm_prune_saves_and_loads_with_the_same_logits(tmp_path: Path) -> None:
    model = tiny_llama()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    report = pk.llm.prune(model, ids, method="wanda", sparsity=0.5, progress=False)
    assert report.sparsity == 0.5
    assert not any("parametrizations" in key for key in model.state_dict())
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert pk.sparsity(loaded, layers="model.layers.*").total == 0.5


def test_llm_prune_keep_masks_keeps_them() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    pk.llm.prune(model, ids, method="wanda", sparsity=0.5, progress=False, keep_masks=True)
    assert get_mask(model.model.layers[0].mlp.up_proj) is not None


# 6. Layers prunekit cannot prune: PruningError naming the layer and the fix ---------------


def frozen_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model[0].weight.requires_grad_(False)
    return model


def weight_norm_net() -> nn.Module:
    with pytest.warns(FutureWarning):
        return nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(8, 8)), nn.Linear(8, 4))


def torch_pruned_net() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    torch_prune.l1_unstructured(model[0], "weight", 0.5)
    return model


BATCHES = [(torch.randn(4, 8), torch.randint(0, 4, (4,)))]


@pytest.mark.parametrize(
    ("build", "settings", "error", "message"),
    [
        (weight_norm_net, dict(layers=["0"]), IncompatibleLayerError, r"layer '0': uses torch.nn.utils.weight_norm.*Fix: fold it"),
        (torch_pruned_net, dict(layers=["0"]), IncompatibleLayerError, r"layer '0': carries torch.nn.utils.prune masks.*Fix"),
        (lambda: nn.Sequential(nn.Linear(0, 4)), {}, NoLayersError, r"0: its weight is empty \(shape \(4, 0\)\)"),
        (lambda: nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 2)), dict(layers=["0"]), IncompatibleLayerError, "empty"),
        (lambda: nn.Sequential(nn.Linear(8, 4, device="meta")), {}, InvalidWeightError, r"layer '0' .*meta device.*Fix"),
        *[(frozen_net, dict(criterion=c, data=BATCHES), IncompatibleLayerError, rf"layer '0' .*frozen.*{c!r} needs")
          for c in ("taylor", "gradient", "snip", "grasp", "synflow")],
    ],
)  # fmt: skip
def test_layers_prunekit_cannot_prune_raise_and_leave_the_model(
    build, settings, error, message
) -> None:
    model = build()
    before = snapshot(model) if not next(model.parameters()).is_meta else None
    with pytest.raises(error, match=message):
        pk.prune(model, 0.5, **settings)
    if before is not None:
        assert_unchanged(model, before)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_skipped_layers_are_reported_when_every_layer_is_asked_for() -> None:
    for model in (weight_norm_net(), torch_pruned_net()):
        report = pk.prune(model, 0.5, include_output=True)
        assert [n for n, _ in report.skipped] == ["0"] and [r.name for r in report.layers] == ["1"]


@pytest.mark.parametrize("model", [None, "model", nn.Linear])
def test_a_model_that_is_not_a_module_is_a_pruning_error(model) -> None:
    with pytest.raises(PruningError, match=r"is not a torch nn.Module; Fix"):
        pk.prune(model, 0.5)
    with pytest.raises(PruningError, match=r"is not a torch nn.Module; Fix"):
        pk.llm.prune(model, torch.zeros(1, 4, dtype=torch.long), progress=False)
    with pytest.raises(PruningError, match=r"is not a torch nn.Module; Fix"):
        pk.sparsity(model)


def test_llm_prune_refuses_meta_weights() -> None:
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(InvalidWeightError, match=r"model.layers.0.self_attn.q_proj.*meta"):
        pk.llm.prune(model, torch.zeros(1, 4, dtype=torch.long), progress=False)
    assert not any(isinstance(m, WeightMask) for m in model.modules())


@pytest.mark.parametrize("seed", ["1", 1.5, True, -1, None])
def test_wrong_seed_types_are_pruning_errors(seed) -> None:
    model = classifier_net()
    with pytest.raises(PruningError, match=rf"PruneSpec.seed={seed!r} is not an int"):
        pk.prune(model, 0.5, criterion="random", seed=seed)
    assert mask_param(model.features) is None
