"""Model specs: zoo names, package.module:factory (+ checkpoint) and transformers dirs."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from torch import nn

import prunekit as pk
from prunekit import cli_model, model_spec, zoo
from prunekit.errors import CheckpointError, MissingModelError, ModelSpecError

FACTORY = """
from torch import nn

def build(width=4):
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 2))

def not_a_module():
    return "a model"

NOT_CALLABLE = 3
"""


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a fresh importable module holding :data:`FACTORY`."""
    name = f"tiny_factory_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_zoo_name_with_kwargs() -> None:
    loaded = model_spec.load_model("lenet300", kwargs={"in_features": 64})
    assert (loaded.kind, loaded.name) == ("zoo", "lenet300")
    assert loaded.model.fc1.in_features == 64


def test_zoo_name_with_bad_kwargs() -> None:
    with pytest.raises(ModelSpecError, match=r"model 'lenet5': kwargs \{'width': 3\} do not fit"):
        model_spec.load_model("lenet5", kwargs={"width": 3})


def test_factory_is_imported_and_called_with_kwargs(factory: str) -> None:
    loaded = model_spec.load_model(f"{factory}:build", kwargs={"width": 6})
    assert (loaded.kind, loaded.name) == ("factory", "build")
    assert loaded.model[0].out_features == 6


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("missing", "has no callable 'missing'"),
        ("NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
        ("not_a_module", "not_a_module() returned a str, not an nn.Module"),
    ],
)
def test_factory_errors(factory: str, attr: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_spec.load_model(f"{factory}:{attr}")


def test_factory_module_that_does_not_import() -> None:
    with pytest.raises(ModelSpecError, match=r"module 'no_such_pkg\.nets' does not import"):
        model_spec.load_model("no_such_pkg.nets:build")


def test_factory_rejecting_kwargs(factory: str) -> None:
    with pytest.raises(ModelSpecError, match=r"calling build\(\*\*\{'depth': 2\}\) failed"):
        model_spec.load_model(f"{factory}:build", kwargs={"depth": 2})


def test_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(MissingModelError, match="does not exist; Fix: pass a zoo name"):
        model_spec.load_model(str(tmp_path / "nowhere"))


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(MissingModelError, match=r"has no config\.json"):
        model_spec.load_model(str(tmp_path))


def test_safetensors_and_torch_checkpoints_round_trip(factory: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = model_spec.load_model(f"{factory}:build").model
    x = torch.randn(3, 8)
    save_model(trained, str(tmp_path / "w.safetensors"))
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        torch.manual_seed(2)  # different initial weights
        loaded = model_spec.load_model(f"{factory}:build", checkpoint=tmp_path / name)
        torch.testing.assert_close(loaded.model(x), trained(x), rtol=0, atol=0)


def test_masked_checkpoint_loads_with_its_masks(tmp_path: Path) -> None:
    model = zoo.build_model("lenet5")
    pk.prune(model, 0.8)
    torch.save(model.state_dict(), tmp_path / "masked.pt")
    loaded = model_spec.load_model("lenet5", checkpoint=tmp_path / "masked.pt").model
    assert pk.sparsity(loaded).total == pytest.approx(0.8, abs=1e-3)
    x = zoo.example_input("lenet5", 2)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_mismatched_masked_checkpoint_leaves_the_model_unchanged(tmp_path: Path) -> None:
    small = zoo.build_model("lenet300", in_features=20)
    pk.prune(small, 0.5)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    same = zoo.build_model("lenet300")
    pk.prune(same, 0.5)
    state = same.state_dict()  # its masks load first, then a mask for a missing layer
    state["nothere.parametrizations.weight.0.packed"] = state[
        "fc1.parametrizations.weight.0.packed"
    ]
    torch.save(state, tmp_path / "extra.pt")
    model = zoo.build_model("lenet300")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = r"fc1.parametrizations.weight.original: checkpoint \(300, 20\) vs model \(300, 784\)"
    with pytest.raises(CheckpointError, match=shapes):
        model_spec.load_checkpoint(model, tmp_path / "small.pt", "lenet300")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['nothere.*Fix: pass"):
        model_spec.load_checkpoint(model, tmp_path / "extra.pt", "lenet300")
    after = model.state_dict()
    assert list(after) == list(before) and pk.sparsity(model).total == 0
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    torch.save({"weights": nn.Linear(2, 2)}, tmp_path / "module.pt")  # a pickled module
    with pytest.raises(CheckpointError, match="weights-only torch file"):
        model_spec.load_model("lenet5", checkpoint=tmp_path / "module.pt")


def test_checkpoint_keys_and_shapes_must_match(factory: str, tmp_path: Path) -> None:
    save_model(model_spec.load_model(f"{factory}:build", kwargs={"width": 5}).model,
               str(tmp_path / "w5.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointError) as info:
        model_spec.load_model(f"{factory}:build", checkpoint=tmp_path / "w5.safetensors")
    assert "0.weight: checkpoint (5, 8) vs model (4, 8)" in str(info.value)
    assert "Fix: pass the checkpoint saved from" in str(info.value)
    with pytest.raises(CheckpointError, match=r"missing keys \['conv1.weight'"):
        model_spec.load_model("lenet5", checkpoint=tmp_path / "w5.safetensors")


def test_missing_and_unreadable_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(MissingModelError, match=r"checkpoint .* does not exist"):
        model_spec.load_model("lenet5", checkpoint=tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="does not read as safetensors"):
        model_spec.load_model("lenet5", checkpoint=tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match=r"has no shrunk\.json"):
        model_spec.load_model("lenet5", checkpoint=tmp_path)


def test_save_shrunk_directory_is_a_checkpoint(tmp_path: Path) -> None:
    model = zoo.build_model("vgg").eval()
    x = zoo.example_input("vgg", 2)
    pk.shrink(model, x, 0.5)
    pk.save_shrunk(model, tmp_path)
    loaded = model_spec.load_model("vgg", checkpoint=tmp_path).model.eval()
    torch.testing.assert_close(loaded(x), model(x))


def test_transformers_directory(tmp_path: Path) -> None:
    from prunekit.zoo.hf import tiny_transformer

    model, inputs = tiny_transformer("gpt2")
    model.save_pretrained(tmp_path)
    loaded = model_spec.load_model(str(tmp_path))
    assert loaded.kind == "transformers" and type(loaded.model).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, model(**inputs).logits)
    example = model_spec.example_inputs(loaded)
    assert example["input_ids"].shape == (1, 16) and int(example["input_ids"].max()) < 100


def test_transformers_directory_without_weights(tmp_path: Path) -> None:
    from prunekit.zoo.hf import tiny_transformer

    tiny_transformer("bert")[0].config.save_pretrained(tmp_path)
    with pytest.raises(ModelSpecError, match="from_pretrained failed"):
        model_spec.load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("config", "problem"),
    [("{}", "Unrecognized model"), ("not json", "not a valid JSON file")],
)
def test_transformers_directory_with_a_bad_config(
    tmp_path: Path, config: str, problem: str
) -> None:
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ModelSpecError, match=f"AutoConfig.from_pretrained failed: .*{problem}"):
        model_spec.load_model(str(tmp_path))


def test_example_inputs_of_a_factory(factory: str) -> None:
    loaded = model_spec.load_model(f"{factory}:build")
    with pytest.raises(ModelSpecError, match="needs an example input; Fix: pass --dataset"):
        model_spec.example_inputs(loaded)
    shape = cli_model.parse_shape("2,8")
    assert model_spec.example_inputs(loaded, input_shape=shape).shape == (2, 8)
    with pytest.raises(ModelSpecError, match="not a list of positive ints"):
        cli_model.parse_shape("2,x")


def test_check_fits_names_the_shapes() -> None:
    data = zoo.load_dataset("digits")
    with pytest.raises(ModelSpecError, match=r"does not accept digits inputs of shape \(1, 8, 8\)"):
        model_spec.check_fits(zoo.build_model("lenet5"), "lenet5", data)


def test_parse_kwargs() -> None:
    assert cli_model.parse_kwargs('{"in_features": 64}') == {"in_features": 64}
    for bad in ("{in_features: 64}", "[1]"):
        with pytest.raises(ModelSpecError, match="--model-kwargs"):
            cli_model.parse_kwargs(bad)
