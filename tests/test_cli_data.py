"""Data as ``package.module:function`` (one contract: :class:`prunekit.cli_model.Loaders`) in
``prunekit prune``, ``export`` and recipes; ``--device`` on ``demo``; help with defaults and
choices; ``--include-output`` / ``--include-embeddings``; ``prunekit shrink`` removing the
masked groups by default, and ``--approximate``."""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit import cli, cli_model, recipes
from prunekit.cli import main
from prunekit.errors import MissingDataError, RecipeError

# ruff: noqa: E501  (the expected messages read best unbroken)

MODULE = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunekit import zoo

CALLS = []


def mlp(hidden=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def normed():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))


def loaders():
    CALLS.append(1)
    d = zoo.load_dataset("digits")
    train = DataLoader(TensorDataset(d.x_train, d.y_train), batch_size=64, shuffle=True)
    return {"train": train, "eval": DataLoader(TensorDataset(d.x_test, d.y_test), batch_size=256)}


def with_calibration():
    out = loaders()
    return {**out, "calibration": [next(iter(out["train"]))]}


def a_list():
    return [1, 2]


def a_generator():
    out = loaders()
    return {"train": (b for b in out["train"]), "eval": out["eval"]}


def not_pairs():
    return {"train": [torch.zeros(2, 64)], "eval": [torch.zeros(2, 64)]}


def raises():
    raise RuntimeError("no data here")
"""


def user_module(source: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``source`` as a module of a fresh name in ``folder``, put on sys.path; its name."""
    name = f"user_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    return name


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's module on sys.path (a model factory and data functions); its name."""
    return user_module(MODULE, tmp_path, monkeypatch)


def test_loaders_contract(user: str) -> None:
    loaders = cli_model.user_loaders(f"{user}:loaders", n_calibration=3)
    assert loaders.name == "loaders" and len(loaders.calibration) == 3
    x, y = loaders.calibration[0]
    assert x.shape == (64, 1, 8, 8) and y.shape == (64,)
    given = cli_model.user_loaders(f"{user}:with_calibration")
    assert len(given.calibration) == 1  # the function's own calibration batches
    assert cli_model.first_input(given).shape == (1, 1, 8, 8)  # the first eval x
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert 0 <= cli_model.evaluator(given)(model) <= 1
    assert cli_model.train_data(given) is given.train
    assert cli_model.train_data(None) is None


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("a_list", "returned list [1, 2], not a mapping with keys train and eval"),
        ("a_generator", "'train' is a generator, not a re-iterable of batches"),
        ("not_pairs", "the first 'eval' batch is Tensor"),
        ("missing", "has no callable 'missing'"),
        ("raises", "RuntimeError: no data here"),
    ],
)
def test_a_data_function_that_breaks_the_contract_is_named(
    user: str, function: str, message: str
) -> None:
    with pytest.raises(Exception, match="") as info:
        cli_model.user_loaders(f"{user}:{function}")
    assert f"'{user}:{function}'" in str(info.value) and message in str(info.value)
    if function in ("a_list", "a_generator", "not_pairs"):
        assert isinstance(info.value, MissingDataError) and "Fix: return {'train'" in str(
            info.value
        )


def test_prune_trains_scores_and_calibrates_on_a_data_function(
    user: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["prune", "--model", f"{user}:mlp", "--dataset", f"{user}:loaders", "--sparsity",
            "0.5", "--criterion", "taylor", "--epochs", "5", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    dense = float(out.split("accuracy: dense ")[1].split("%")[0]) / 100
    assert dense > 0.5  # trained on the user's DataLoader and scored on theirs
    weights = load_file(tmp_path / "model.safetensors")
    hidden = weights["1.weight"]
    assert (hidden == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{user}:a_list", "returned list [1, 2], not a mapping"),
        ("{user}:raises", "no data here"),
        ("nope_module_xyz:f", "data 'nope_module_xyz:f': module 'nope_module_xyz' does not"),
        (":", "data ':': module '' does not import"),
        ("..:f", "data '..:f': module '..' does not import"),
    ],
)
def test_prune_with_a_bad_data_function_is_one_line_and_exit_2(
    user: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, message: str
) -> None:
    out = tmp_path / "out"
    argv = ["prune", "--model", f"{user}:mlp", "--dataset", spec.format(user=user),
            "--sparsity", "0.5", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_export_takes_the_onnx_example_from_a_data_function(user: str, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    argv = ["export", "--model", f"{user}:mlp", "--dataset", f"{user}:loaders", "--format",
            "onnx", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "mlp.onnx").stat().st_size > 0


RECIPE = """\
name: loaders
model: {user}:mlp
data: {user}:loaders
train: {{epochs: 2}}
prune: {{sparsity: 0.5, criterion: taylor}}
finetune: {{epochs: 1}}
"""


def test_recipe_data_function_is_called_once_at_load_and_runs(
    user: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    module = importlib.import_module(user)
    recipe = recipes.loads(RECIPE.format(user=user), "r.yaml")
    assert module.CALLS == [1] and recipe.loaders is not None  # checked when read
    assert recipe["data"]["dataset"] == f"{user}:loaders"
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(user=user))
    assert main(["run", str(path), "--quick", "--out", str(tmp_path / "runs")]) == 0
    assert "report:" in capsys.readouterr().out
    results = (tmp_path / "runs" / "loaders" / "results.json").read_text()
    assert '"stage": "fine-tuned"' in results


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{user}:a_list", "r.yaml:3: data.dataset = '{user}:a_list' is invalid: data '{user}:a_list' returned list [1, 2], not a mapping"),
        ("{user}:missing", "r.yaml:3: data.dataset = '{user}:missing' is invalid: data '{user}:missing': {user} has no callable 'missing'"),
        ("{{dataset: '{user}:loaders', flat: true}}", "r.yaml:3: data.flat = True is not used with a data function (its loaders make the batches); Fix: drop data.flat."),
        ("mnist", "r.yaml:3: data.dataset = 'mnist' is not one of digits, mnist5k, mnist1d; Fix: did you mean 'mnist5k'?"),
    ],
)  # fmt: skip
def test_recipe_data_errors_name_their_line(user: str, data: str, message: str) -> None:
    data = data.format(user=user).replace("{{", "{").replace("}}", "}")
    text = RECIPE.format(user=user).replace(f"data: {user}:loaders", f"data: {data}")
    with pytest.raises(RecipeError) as info:
        recipes.loads(text, "r.yaml")
    assert str(info.value).startswith(message.format(user=user)), str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a cuda device")
def test_demo_refuses_an_unavailable_device_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'cuda' is not available on this machine" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("demo", ["--device {cpu,cuda,mps}", "(default: cpu)", "(default: 0)"]),
        ("prune", ["--scope {local,global}", "(default: local)", "(default: element)",
                   "one of element, row, column, kernel, filter, channel, N:M",
                   "one of gradient, grasp, l1, l2, magnitude", "(default: magnitude)",
                   "package.module:function returning"]),
        ("shrink", ["--scope {local,global}", "(default: l2)", "(default: 1)"]),
        ("sensitivity", ["one of element, row", "(default: magnitude)", "(default: 0.8)"]),
        ("sweep", ["<criterion>[-<granularity>][-global|-local]", "{masks,shrink,sparse}"]),
        ("export", ["{safetensors,", "package.module:function returning"]),
    ],
)  # fmt: skip
def test_help_lists_defaults_and_choices(
    command: str, shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for item in shown:
        assert item in text, (command, item)


def _options(parser: argparse.ArgumentParser, name: str) -> list[tuple[str, argparse.Action]]:
    """Every option of ``parser`` and of its subcommands, with the command it belongs to."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                found += _options(subparser, f"{name} {sub}")
        else:
            found.append((name, action))
    return found


def test_every_option_with_a_default_shows_it_in_help() -> None:
    # argparse prints "(default: ...)" only beside a help text
    options = _options(cli._parser(), "prunekit")
    assert len(options) > 50
    silent = [(command, action.option_strings) for command, action in options
              if action.default not in (None, False, argparse.SUPPRESS)
              and not (action.help and action.help.strip())]  # fmt: skip
    assert silent == []


def _zeros(path: Path, name: str) -> float:
    return (load_file(path)[name] == 0).float().mean().item()


def test_prune_keeps_the_output_layer_dense_unless_include_output(
    user: str, tmp_path: Path
) -> None:
    common = ["prune", "--model", f"{user}:mlp", "--sparsity", "0.5", "--input-shape", "1,64"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert _zeros(tmp_path / "a" / "model.safetensors", "1.weight") == pytest.approx(0.5)
    assert _zeros(tmp_path / "a" / "model.safetensors", "3.weight") == 0  # the classifier
    assert main([*common, "--include-output", "--out", str(tmp_path / "b")]) == 0
    assert _zeros(tmp_path / "b" / "model.safetensors", "3.weight") == pytest.approx(0.5)


def test_sweep_passes_include_output_to_every_method(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prunekit import cli_analysis

    seen: list[dict] = []

    def fake_sweep(*args, methods, **kwargs):
        seen.append(methods)
        raise RecipeError("stop here")  # the options are all the test needs

    monkeypatch.setattr(cli_analysis, "sweep", fake_sweep)
    argv = ["sweep", "--model", "lenet300", "--dataset", "digits", "--methods",
            "magnitude-global,l2-row", "--out", str(tmp_path)]  # fmt: skip
    assert main([*argv, "--include-output", "--include-embeddings"]) == 2
    assert [m["include_output"] and m["include_embeddings"] for m in seen[0].values()] == [
        True,
        True,
    ]
    assert main(argv) == 2
    assert not any(m["include_output"] for m in seen[1].values())


def test_shrink_removes_exactly_the_pruned_filters_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", "lenet5", "--sparsity", "0.5", "--granularity", "filter",
                 "--criterion", "l2", "--epochs", "0", "--out", str(pruned)]) == 0  # fmt: skip
    weights = pruned / "model.safetensors"
    assert main(["shrink", "--model", "lenet5", "--out", str(tmp_path / "s")]) == 2  # none zero
    assert "no masked channel group to remove" in capsys.readouterr().err
    argv = [
        "shrink",
        "--model",
        "lenet5",
        "--checkpoint",
        str(weights),
        "--out",
        str(tmp_path / "s"),
    ]
    assert main(argv) == 0
    from prunekit import load_shrunk, model_spec, zoo

    shrunk = load_shrunk(zoo.build_model("lenet5"), tmp_path / "s")
    masked = model_spec.load_model("lenet5", checkpoint=weights).model
    assert shrunk.conv1.out_channels == masked.conv1.out_channels // 2
    kept = masked.conv1.weight.flatten(1).abs().sum(1) > 0  # the filters prune kept
    assert torch.equal(shrunk.conv1.weight, masked.conv1.weight[kept])
    assert "approximate" not in capsys.readouterr().out


def test_shrink_approximate_reports_its_deviation(
    user: str, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["shrink", "--model", f"{user}:normed", "--input-shape", "4,64", "--ratio", "0.5"]
    assert main(common) == 0
    assert "APPROXIMATE" not in capsys.readouterr().out
    assert main([*common, "--approximate"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    note = "the outputs deviate from the group-masked model's by "
    assert out.count(note) == 1  # the report's note, said once
    deviation = float(out.split(note)[1].split()[0])
    assert deviation > 0 and "APPROXIMATE (not equivalent)" in out


def test_shrink_help_says_what_the_default_ratio_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shrink", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default: exactly the groups whose weights are all zero" in text
    assert "--approximate INEXACT" in text


@pytest.mark.parametrize(
    ("method", "stage"),
    [
        ("prune: {sparsity: 0.5}\nschedule: {kind: cubic}\ntiming: {when: during, method: gradual}",
         "trained while pruning"),
        ("prune: {sparsity: 0.5}\nschedule: {kind: iterative, rounds: 2}\n"
         "timing: {when: before, method: lottery}", "round 2"),
        ("prune: {sparsity: 0.5, granularity: filter, criterion: l2}\n"
         "timing: {when: during, method: soft-filter}", "final"),
    ],
)  # fmt: skip
def test_every_recipe_pipeline_runs_on_a_data_function(
    user: str, tmp_path: Path, method: str, stage: str
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(f"name: loaders\nmodel: {user}:mlp\ndata: {user}:loaders\n{method}\n")
    assert main(["run", str(path), "--quick", "--out", str(tmp_path / "runs")]) == 0
    results = json.loads((tmp_path / "runs" / "loaders" / "results.json").read_text())
    rows = next(s["rows"] for s in results["sections"] if s["heading"] == "Accuracy")
    assert stage in [row["stage"] for row in rows]
    assert all(0 <= row["accuracy"] <= 1 for row in rows)  # scored on the eval loader
