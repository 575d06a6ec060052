"""Recipe validation: every error names file:line, the key, the value and the fix."""

# ruff: noqa: E501  (the expected messages read best unbroken)

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunekit.errors import PruningError, RecipeError
from prunekit.recipes import loads
from prunekit.recipes.schema import SCHEMA
from prunekit.recipes.source import parse

VALID = """\
name: demo
model: lenet5
data: {dataset: digits}
train:
  epochs: 2
  lr: 1e-3
prune:
  granularity: filter
  criterion: l2
  sparsity: 0.5
schedule:
  kind: iterative
  start: 0.0
  end: 0.5
finetune: {epochs: 1}
materialize: {mode: shrink}
export: {formats: [safetensors, csr]}
"""


def error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        loads(text, "r.yaml")
    return str(info.value)


def replace(line: int, new: str, text: str = VALID) -> str:
    """``text`` with its 1-based ``line`` replaced by ``new``."""
    lines = text.splitlines()
    lines[line - 1] = new
    return "\n".join(lines) + "\n"


def test_valid_recipe_fills_defaults() -> None:
    recipe = loads(VALID, "r.yaml")
    assert recipe.name == "demo"
    assert recipe["model"] == {"spec": "lenet5", "kwargs": {}, "checkpoint": None}
    assert recipe["train"]["lr"] == 1e-3 and isinstance(recipe["train"]["lr"], float)
    assert recipe["timing"] == {
        "when": "after", "method": "finetune", "rewind": "init", "sparsity_lambda": 1e-4,
        "control": False,
    }  # fmt: skip
    assert recipe["schedule"]["rounds"] == 4 and recipe.granularity.name == "filter"


@pytest.mark.parametrize(
    ("line", "new", "expected"),
    [
        (9, "  critrion: l2", "r.yaml:9: unknown key 'prune.critrion'; Fix: did you mean 'criterion'?"),
        (1, "nme: demo", "r.yaml:1: unknown key 'nme'; Fix: did you mean 'name'?"),
        (5, "  epochs: two", "r.yaml:5: train.epochs = 'two' is str, expected an integer"),
        (5, "  epochs: true", "r.yaml:5: train.epochs = True is bool, expected an integer"),
        (10, "  sparsity: 1.5", "r.yaml:10: prune.sparsity = 1.5 must be < 1"),
        (6, "  lr: 0", "r.yaml:6: train.lr = 0 must be > 0"),
        (3, "data: {dataset: mnist}", "r.yaml:3: data.dataset = 'mnist' is not one of digits, mnist5k, mnist1d; Fix: did you mean 'mnist5k'?"),
        (8, "  granularity: 3:4:5", "r.yaml:8: prune.granularity = '3:4:5' is invalid: unknown granularity"),
        (9, "  criterion: magic", "r.yaml:9: prune.criterion = 'magic' is invalid: unknown criterion"),
        (14, "  end: 0.0", "r.yaml:14: schedule.end = 0.0 must be > 0"),
        (13, "  start: 0.6", "r.yaml:14: schedule.end = 0.5 is not after start 0.6: the schedule ends before it starts"),
        (17, "export: {formats: [nm]}", "r.yaml:17: export.formats = 'nm' needs N:M masks, not 'filter'"),
        (16, "materialize: {mode: sparse}", "r.yaml:17: export.formats = ['csr'] converts a model that materialize: sparse has converted already"),
        (17, "export: {formats: [csr, tflite]}", "r.yaml:17: export.formats = ['csr', 'tflite'] has unknown formats ['tflite']"),
        (1, "name: ../escape", "r.yaml:1: name = '../escape' is not a folder name"),
    ],
)  # fmt: skip
def test_error_names_line_key_value(line: int, new: str, expected: str) -> None:
    message = error(replace(line, new))
    assert message.startswith(expected), message
    assert "Fix:" in message


def test_nm_with_physical_shrink_is_impossible() -> None:
    text = replace(8, "  granularity: '2:4'").replace("  sparsity: 0.5\n", "")
    text = text.replace("kind: iterative", "kind: one-shot")
    message = error(text)
    assert message.startswith("r.yaml:15: materialize.mode = 'shrink' with granularity '2:4' ")
    assert "keeps every channel" in message and "format: nm" in message


def test_nm_cannot_grow_on_a_schedule() -> None:
    text = replace(8, "  granularity: '2:4'").replace("  sparsity: 0.5\n", "")
    assert error(text).startswith("r.yaml:11: schedule.kind = 'iterative' grows the sparsity")


def test_data_driven_criterion_without_data() -> None:
    text = VALID.replace("data: {dataset: digits}\n", "").replace("l2", "taylor")
    text = text.replace("epochs: 2", "epochs: 0").replace("epochs: 1", "epochs: 0")
    text = text.replace("kind: iterative", "kind: one-shot")
    message = error(text)
    assert message.startswith("r.yaml:8: prune.criterion = 'taylor' scores weights on data")
    assert "Fix: add 'data: {dataset: mnist5k}'" in message


def test_training_without_data() -> None:
    text = VALID.replace("data: {dataset: digits}\n", "")
    assert error(text).startswith("r.yaml:4: train.epochs = 2 trains the model, which needs data")


def test_method_must_belong_to_when() -> None:
    text = VALID + "timing: {when: before, method: gradual}\n"
    message = error(text)
    assert message.startswith("r.yaml:18: timing.method = 'gradual' is not a method for when:")
    assert "Fix: one of at-init, lottery." in message


def test_section_of_the_other_kind() -> None:
    assert error(VALID + "llm: {method: wanda}\n").startswith(
        "r.yaml:18: llm = {'method': 'wanda'} does not apply to kind: prune"
    )


def test_yaml_syntax_error_has_its_line() -> None:
    message = error(VALID + "prune: [unclosed\n")
    assert message.startswith("r.yaml:19: not valid YAML")


def test_duplicate_key_is_an_error() -> None:
    assert error(VALID + "seed: 1\nseed: 2\n").startswith(
        "r.yaml:19: key 'seed' is given twice (first on line 18)"
    )


def test_missing_name_and_unsafe_tags() -> None:
    assert error("model: lenet5\n").startswith("r.yaml:1: name is missing; Fix: add name:")
    unsafe = error("name: x\nmodel: !!python/object/apply:os.system [ls]\n")
    assert unsafe.startswith("r.yaml:2: tag 'tag:yaml.org,2002:python/object/apply:os.system'")
    assert "not valid YAML" in error("name: x\nseed: !!python/name:os.system ''\n")


def test_llm_recipe_checks_its_sparsity() -> None:
    base = "name: l\nkind: llm\nmodel: char-llama\nllm:\n  sparsity: '2:4'\n  allocation: owl\n"
    assert error(base).startswith("r.yaml:6: llm.allocation = 'owl' varies sparsity per block")
    assert "is neither a fraction nor an N:M" in error(base.replace("'2:4'", "half"))
    assert loads(base.replace("owl", "uniform"), "r.yaml")["llm"]["sparsity"] == "2:4"


# Random mutations of the valid recipe: each either validates or raises RecipeError.
_DATA = yaml.safe_load(VALID)
_KEYS = [(s, k) for s, v in SCHEMA.items() if isinstance(v, dict) for k in v] + [
    (k, None) for k in SCHEMA
]
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10), st.floats(-2, 2), st.just(float("nan")),
    st.sampled_from(["element", "2:4", "filter", "taylor", "snip", "global", "sparse", "nm",
                     "cubic", "one-shot", "during", "before", "lottery", "at-init", "x"]),
    st.lists(st.sampled_from(["csr", "nm", "onnx", "fc3", 1]), max_size=3),
    st.dictionaries(st.sampled_from(["a", "fc1", "kind"]), st.floats(0, 1), max_size=2),
)  # fmt: skip
_MUTATION = st.tuples(st.sampled_from(_KEYS), st.sampled_from(["set", "drop", "add"]), _VALUES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_recipe_validates_or_raises_recipe_error(mutations: list) -> None:
    data = copy.deepcopy(_DATA)
    for (section, key), action, value in mutations:
        if key is not None and not isinstance(data.get(section), dict):
            data[section] = {}
        target = data if key is None else data[section]
        name = section if key is None else key
        if action == "drop":
            target.pop(name, None)
        elif action == "add":
            target[name + "_x"] = value
        else:
            target[name] = value
    text = yaml.safe_dump(data, sort_keys=False)
    try:
        loads(text, "m.yaml")
    except RecipeError as err:
        assert str(err).startswith("m.yaml:") and "Fix:" in str(err)
    except PruningError as err:  # pragma: no cover - the failure this test hunts for
        pytest.fail(f"{type(err).__name__} instead of RecipeError: {err}")


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("lottery", "timing: {when: before, method: lottery}\n"),
        ("slimming", "timing: {when: during, method: slimming}\nschedule: {kind: one-shot}\n"),
        ("at-init", "timing: {when: before, method: at-init}\n"),
    ],
)
def test_allocation_map_is_refused_where_the_method_ignores_it(method: str, extra: str) -> None:
    base = "name: a\nmodel: lenet5\ndata: {dataset: digits}\nprune:\n"
    gran = "filter" if method == "slimming" else "element"
    crit = "synflow" if method == "at-init" else "magnitude"
    sched = "schedule: {kind: iterative}\n" if method == "at-init" else ""
    text = (
        f"{base}  granularity: {gran}\n  criterion: {crit}\n  allocation: {{fc1: 0.5}}\n"
        f"{extra}{sched}"
    )
    message = error(text)
    takes = "prune.sparsity alone"
    if method == "lottery":  # and the two coverage flags, which it passes on
        takes = "prune.sparsity, prune.include_output, prune.include_embeddings"
    assert message.startswith(
        f"r.yaml:7: prune.allocation = {{'fc1': 0.5}} is not used by {method}, which takes "
        f"{takes}; Fix: drop allocation"
    ), message


def test_rewind_error_says_what_it_must_be() -> None:
    message = error(VALID + "timing: {rewind: -1}\n")
    assert message.startswith(
        "r.yaml:18: timing.rewind = -1 is neither 'init' nor an optimizer step >= 0; Fix:"
    ), message


def test_llm_recipe_refuses_model_settings_it_would_ignore() -> None:
    base = "name: l\nkind: llm\nmodel:\n  spec: char-llama\n  checkpoint: w.safetensors\n"
    assert error(base).startswith(
        "r.yaml:5: model.checkpoint = 'w.safetensors' is not used by kind: llm"
    )
    kwargs = base.replace("checkpoint: w.safetensors", "kwargs: {hidden: 64}")
    assert "Fix: drop model.kwargs." in error(kwargs)


def test_nested_yaml_aliases_are_shared_not_expanded() -> None:
    levels = ["a0: &a0 [csr, csr, csr, csr, csr, csr, csr, csr, csr, csr]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    source = parse("name: b\n" + "\n".join(levels) + "\n", "r.yaml")  # 10^9 leaves if copied
    top = source.data["a8"]
    assert len(top) == 10 and top[0] is top[9] and top[0][0] is source.data["a6"]
    assert source.line(("a8",)) == 10
    text = "name: a\nmodel: lenet5\ntrain: {epochs: 0}\nfinetune: {epochs: 0}\n"
    text += "prune:\n  sparsity: 0.5\n  layers: &l [fc1, fc2]\n  exclude: *l\n"
    assert loads(text, "r.yaml")["prune"]["exclude"] == ["fc1", "fc2"]


def test_lottery_refuses_a_criterion_it_would_ignore() -> None:
    text = (
        "name: l\nmodel: lenet5\ndata: {dataset: digits}\n"
        "prune: {sparsity: 0.5, criterion: taylor}\ntiming: {when: before, method: lottery}\n"
    )
    assert error(text).startswith(
        "r.yaml:4: prune.criterion = 'taylor' is not used by lottery tickets, which prune by "
        "magnitude (Frankle & Carbin 2019); Fix: criterion: magnitude"
    )
    assert loads(text.replace("taylor", "magnitude"), "r.yaml")["timing"]["method"] == "lottery"


@pytest.mark.parametrize(
    "timing", ["timing: {when: during, method: gradual}\n", "schedule: {kind: cubic}\n"]
)
def test_allocation_map_is_refused_on_a_pruner_schedule(timing: str) -> None:
    text = (
        "name: g\nmodel: lenet5\ndata: {dataset: digits}\n"
        "prune: {scope: local, allocation: {fc1: 0.8}}\n" + timing
    )
    assert error(text).startswith(
        "r.yaml:4: prune.allocation = {'fc1': 0.8} fixes every layer's final sparsity, which the"
    )
    one_shot = text.replace(timing, "")
    assert loads(one_shot, "r.yaml")["prune"]["allocation"] == {"fc1": 0.8}


def test_device_is_checked_with_its_line() -> None:
    with_device = VALID.replace("model: lenet5\n", "model: lenet5\ndevice: tpu\n")
    assert error(with_device).startswith("r.yaml:3: device = 'tpu' is not one of cpu, cuda, mps")
    assert loads(with_device.replace("tpu", "cpu"), "r.yaml")["device"] == "cpu"
    assert loads(VALID, "r.yaml")["device"] == "cpu"  # the default
    llm = "name: l\nkind: llm\nmodel: char-llama\ndevice: mps\n"
    message = error(llm)
    assert message.startswith("r.yaml:4: device = 'mps' ") and "Fix: device: cpu" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a cuda device")
def test_a_device_the_machine_lacks_is_refused_at_its_line() -> None:
    message = error(VALID.replace("model: lenet5\n", "model: lenet5\ndevice: cuda\n"))
    assert message.startswith(
        "r.yaml:3: device = 'cuda' is not available on this machine (torch sees no cuda device)"
    )
    assert message.endswith("Fix: device: cpu.")
