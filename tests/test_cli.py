"""Tests for the ``prunekit`` command line (the demo has its own file, test_demo.py)."""

# ruff: noqa: E501  (expected error messages read best unbroken)

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

import prunekit
from prunekit import model_spec, zoo
from prunekit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_profile_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "total" in out and "Latency" in out


def test_bad_sparsity_is_one_red_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["prune", "--model", "lenet300", "--dataset", "mnist5k", "--sparsity", "1.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sparsity=1.5" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unknown_model_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", "lenet6"]) == 2
    assert "'lenet6'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert prunekit.__version__ in capsys.readouterr().out


def test_python_dash_m_prunekit() -> None:
    src = str(Path(prunekit.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run(
        [sys.executable, "-m", "prunekit", "--version"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0 and prunekit.__version__ in done.stdout


def test_shrink_command_saves_a_loadable_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["shrink", "--model", "vgg", "--ratio", "0.5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "prunekit shrink" in out and "speed-up (batch 1): " in out
    assert "interleaved repeats" in out and "load " in out and "x fewer" in out
    loaded = prunekit.load_shrunk(zoo.build_model("vgg"), tmp_path)
    assert loaded.features[0].out_channels == 8


def test_shrink_command_bad_ratio_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shrink", "--model", "vgg", "--ratio", "1.5"]) == 2
    assert "ratio" in capsys.readouterr().err


def test_a_library_fix_is_spelled_as_the_command_flags(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["prune", "--model", "lenet300", "--sparsity", "0.5", "--exclude", "fc1", "fc2"]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "as the output layer; Fix: --include-output, or select other layers." in err
    assert "include_output=True" not in err
    assert main(["shrink", "--model", "lenet5"]) == 2  # nothing masked: nothing to remove
    err = " ".join(capsys.readouterr().err.split())
    assert "Fix: pass --ratio 0.5 (fraction of groups to remove)" in err and "ratio=" not in err
    assert "pk.prune(model, s, granularity='filter')" in err  # a Python call stays one


FACTORY = """
from torch import nn

def mlp(hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
"""


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"cli_factory_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:mlp"


def test_prune_factory_with_checkpoint_and_no_data(factory: str, tmp_path: Path) -> None:
    trained = model_spec.load_model(factory).model
    save_model(trained, str(tmp_path / "w.safetensors"))
    out = tmp_path / "out"
    argv = ["prune", "--model", factory, "--checkpoint", str(tmp_path / "w.safetensors"),
            "--sparsity", "0.75", "--input-shape", "1,64", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    pruned = model_spec.load_model(factory, checkpoint=out / "model.safetensors").model
    assert prunekit.sparsity(pruned).total == pytest.approx(0.75, abs=1e-3)
    kept = pruned[1].weight != 0  # the survivors keep their trained values
    assert torch.equal(pruned[1].weight[kept], trained[1].weight[kept])


def test_prune_factory_trains_and_fine_tunes_with_a_dataset(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["prune", "--model", factory, "--dataset", "digits", "--sparsity", "0.5",
            "--criterion", "taylor", "--epochs", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert "accuracy: dense" in capsys.readouterr().out


def test_prune_transformers_directory(tmp_path: Path) -> None:
    from prunekit.zoo.hf import tiny_transformer

    tiny_transformer("bert")[0].save_pretrained(tmp_path / "bert")
    argv = ["prune", "--model", str(tmp_path / "bert"), "--sparsity", "0.5", "--out",
            str(tmp_path / "pruned")]  # fmt: skip
    assert main(argv) == 0
    pruned = model_spec.load_model(str(tmp_path / "pruned")).model  # save_pretrained dir
    assert type(pruned).__name__ == "BertModel"
    layer = pruned.encoder.layer[0].attention.self.query.weight
    assert (layer == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--criterion", "taylor"], "criterion 'taylor' scores weights on data; Fix: pass --dataset"),
        (["--epochs", "2"], "--epochs 2 / --finetune-epochs 0 train the model, which needs data"),
        (["--checkpoint", "missing.safetensors"], "checkpoint 'missing.safetensors' does not exist"),
        (["--model-kwargs", '{"hidden": 8}', "--checkpoint", "W"], "1.weight: checkpoint (16, 64) vs model (8, 64)"),
    ],
)  # fmt: skip
def test_prune_bad_input_exits_2_and_writes_nothing(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list, message: str
) -> None:
    save_model(model_spec.load_model(factory).model, str(tmp_path / "w.safetensors"))
    extra = [str(tmp_path / "w.safetensors") if e == "W" else e for e in extra]
    out = tmp_path / "out"
    argv = ["prune", "--model", factory, "--sparsity", "0.5", "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no/such/dir", "model 'no/such/dir' does not exist"),
        ("no_such_module_xyz:build", "module 'no_such_module_xyz' does not import"),
    ],
)
def test_prune_missing_model_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str, message: str
) -> None:
    out = tmp_path / "out"
    assert main(["prune", "--model", model, "--sparsity", "0.5", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


RECIPE = """\
name: cli-run
model: {spec: lenet300, kwargs: {in_features: 64}}
data: {dataset: digits}
train: {epochs: 1}
prune: {sparsity: 0.8, scope: global}
finetune: {epochs: 0}
"""


def test_run_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE)
    assert main(["run", str(tmp_path / "r.yaml"), "--quick", "--out", str(tmp_path / "runs")]) == 0
    report = tmp_path / "runs" / "cli-run" / "report.html"
    assert f"report: {report}" in capsys.readouterr().out.replace("\n", "")
    assert report.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("finetune: {epochs: 0}", "finetune: {epoch: 0}"), "r.yaml:6: unknown key 'finetune.epoch'; Fix: did you mean 'epochs'?"),
        (("spec: lenet300", "spec: lenet301"), "r.yaml:2: model = 'lenet301' does not load: model 'lenet301' does not exist"),
        (("in_features: 64", "in_features: 65"), "r.yaml:2: model = 'lenet300' does not load: model 'lenet300' does not accept digits inputs"),
        (("sparsity: 0.8, scope: global", "sparsity: 0.8, layers: [conv9]"), "r.yaml:5: prune = {'granularity': 'element', 'criterion': 'magnitude', 'sco... fails on the model: no prunable layer matched layers=['conv9']"),
    ],
)  # fmt: skip
def test_run_bad_recipe_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: tuple, message: str
) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE.replace(*change))
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/{message}"), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["run", "export", "prune", "shrink", "profile"])
def test_help_of_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: prunekit {command}") and "--help" in out


def test_run_missing_recipe_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "runs")]) == 2
    assert f"recipe '{tmp_path / 'none.yaml'}' cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a cuda device")
@pytest.mark.parametrize(
    "argv",
    [
        ["profile", "--model", "lenet5"],
        ["shrink", "--model", "vgg"],
        ["prune", "--model", "lenet5", "--sparsity", "0.5"],
        ["export", "--model", "lenet5", "--out", "OUT"],
        ["sensitivity", "--model", "lenet300", "--dataset", "digits"],
        ["sweep", "--model", "lenet300", "--dataset", "digits"],
    ],
)
def test_an_unavailable_device_is_one_line_and_exit_2(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tmp_path / "x") if a == "OUT" else a for a in argv]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'cuda' is not available on this machine" in err
    assert "Fix: pass cpu" in err and list(tmp_path.iterdir()) == []


def test_device_cpu_runs_and_an_unknown_device_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["profile", "--model", "lenet5", "--device", "cpu"]) == 0
    assert main(["profile", "--model", "lenet5", "--device", "tpu"]) == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    with pytest.raises(prunekit.errors.UsageError, match="not one of cpu, cuda, mps"):
        model_spec.device("tpu")


def test_help_of_the_model_commands_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("prune", "profile", "shrink", "export"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--device {cpu,cuda,mps}" in text and "(default: cpu)" in text, command
    assert main(["shrink", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    ratio = text.split("--ratio RATIO ")[1].split(" --criterion ")[0]  # its own help only
    assert ratio.endswith("refused when there are none (default: None)")  # the masked groups
