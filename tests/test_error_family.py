"""One error family everywhere, bounded resources: a user's mistake is a PruningError
subclass naming the value and the fix (the CLI: one line, exit code 2, no traceback), an
exception inside a user's own callback is re-raised wrapped with the callback named, and
arguments that size allocations are clamped or refused before anything is allocated."""

from __future__ import annotations

import json
import resource
import sys
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import prunekit as pk
from prunekit import model_spec, zoo
from prunekit.cli import _parser, main
from prunekit.errors import (
    CheckpointError,
    InvalidInputsError,
    ModelSpecError,
    UsageError,
    UserCallbackError,
)

pytestmark = pytest.mark.usefixtures("one_thread")
HUGE = str(10**30)

FACTORY = """
from torch import nn

def mlp(hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

def boom():
    raise RuntimeError("kaboom")
"""


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh importable module holding :data:`FACTORY`."""
    name = f"family_factory_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@contextmanager
def address_space(extra: int) -> Iterator[None]:
    """At most ``extra`` more bytes of address space for the body: an allocation past it
    fails (a RuntimeError) instead of growing until the kernel kills the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        used = int(statm.read().split()[0]) * resource.getpagesize()
    limit = used + extra if hard == resource.RLIM_INFINITY else min(hard, used + extra)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's stderr for ``argv``, asserted to be one line and exit code 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ")
    return err


# -- 1. bounded resources ----------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc")
@pytest.mark.parametrize("scope", ["global", "local"])
def test_a_huge_min_keep_allocates_nothing_beyond_the_layers(scope: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 50))  # 50k weights
    with address_space(1 << 30):  # min_keep=10**9 once took 12 GB of scratch
        pk.prune(model, 0.5, scope=scope, min_keep=10**9)
    assert pk.sparsity(model).total == 0  # every layer keeps all of its (fewer) groups


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("1,99999999999999999999", "holds 99,999,999,999,999,999,999 elements, more than"),
        ("100000,100000", "more than the 268,435,456 an example input may take"),
    ],
)
def test_input_shape_is_refused_before_allocating(
    factory: str, shape: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["profile", "--model", f"{factory}:mlp", f"--input-shape={shape}"]
    assert message in one_line_exit_2(argv, capsys)


def test_a_negative_input_shape_is_one_line(factory: str, capsys) -> None:
    err = one_line_exit_2(
        ["profile", "--model", f"{factory}:mlp", "--input-shape", "-1,64"], capsys
    )
    assert "--input-shape: expected one argument" in err and "prunekit profile --help" in err
    err = one_line_exit_2(["profile", "--model", f"{factory}:mlp", "--input-shape=-1,64"], capsys)
    assert "'-1,64' is not a list of positive ints" in err


def test_an_input_shape_the_model_does_not_take(factory: str, capsys) -> None:
    argv = ["prune", "--model", f"{factory}:mlp", "--sparsity", "0.5", "--input-shape", "1,784"]
    err = one_line_exit_2(argv, capsys)
    assert "does not run on the example input of shape (1, 784)" in err and "Fix:" in err


def test_a_transformers_config_larger_than_its_weights_is_refused(tmp_path: Path) -> None:
    from prunekit.zoo.hf import tiny_transformer

    tiny_transformer("gpt2")[0].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"vocab_size": 10**9}))
    with pytest.raises(ModelSpecError, match=r"builds a GPT2LMHeadModel of [\d,]+ weights but"):
        model_spec.load_model(str(tmp_path))


# -- 2. the CLI: one line, exit code 2 ---------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--seed", HUGE],
        ["prune", "--model", "lenet5", "--sparsity", "0.5", "--seed", HUGE],
        ["prune", "--model", "lenet5", "--sparsity", "0.5", "--epochs", "-1"],
        ["sensitivity", "--model", "lenet300", "--dataset", "digits", "--seed", HUGE],
        ["sweep", "--model", "lenet300", "--dataset", "digits", "--seeds", f"0,{HUGE}"],
        ["llm", "prune", "--model", "char-llama", "--out", "x", "--seed", HUGE],
        ["llm", "build-lm", "--steps", "-1"],
    ],
)
def test_huge_or_negative_ints_are_one_line(argv: list[str], capsys) -> None:
    err = one_line_exit_2(argv, capsys)
    assert "is not an int in 0..2**63-1" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: command"),
        (["profile"], "prunekit profile: the following arguments are required: --model"),
        (["profile", "--model", "lenet5", "--nope"], "unrecognized arguments: --nope"),
        (["export", "--model", "lenet5", "--out", "o", "--format", "x"], "invalid choice: 'x'"),
        (["llm"], "prunekit llm: the following arguments are required: llm_command"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], message: str, capsys) -> None:
    assert message in one_line_exit_2(argv, capsys)
    with pytest.raises(UsageError):
        _parser().parse_args(argv)


def test_sensitivity_target_and_budget_fail_before_training(capsys) -> None:
    base = ["sensitivity", "--model", "lenet300", "--dataset", "digits", "--epochs", "0"]
    assert "budget=nan" in one_line_exit_2([*base, "--budget", "nan"], capsys)
    assert "target=2.0" in one_line_exit_2([*base, "--target", "2"], capsys)


def test_a_factory_that_raises(factory: str, capsys) -> None:
    with pytest.raises(UserCallbackError, match=rf"model factory '{factory}:boom'") as info:
        model_spec.load_model(f"{factory}:boom")
    assert isinstance(info.value.__cause__, RuntimeError) and "kaboom" in str(info.value)
    assert "kaboom" in one_line_exit_2(["profile", "--model", f"{factory}:boom"], capsys)


def test_zoo_kwargs_that_do_not_build(capsys) -> None:
    argv = ["profile", "--model", "lenet5", "--model-kwargs", '{"num_classes": -1}']
    assert "kwargs {'num_classes': -1} do not fit" in one_line_exit_2(argv, capsys)


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    from prunekit.zoo.hf import tiny_transformer

    tiny_transformer("gpt2")[0].save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0])
def test_a_transformers_directory_with_truncated_weights(hf_dir: Path, keep: float, capsys) -> None:
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(5, int(len(data) * keep))])
    with pytest.raises(ModelSpecError, match=r"model\.safetensors is not a readable safetensors"):
        model_spec.load_model(str(hf_dir))
    assert "not a readable safetensors file" in one_line_exit_2(
        ["profile", "--model", str(hf_dir)], capsys
    )


def test_a_transformers_directory_with_pickle_weights_is_never_unpickled(
    hf_dir: Path, tmp_path: Path, capsys
) -> None:
    witness = tmp_path / "unpickled"

    class Hostile:
        def __reduce__(self):
            return (Path.touch, (witness,))

    (hf_dir / "model.safetensors").unlink()
    torch.save({"payload": Hostile()}, hf_dir / "pytorch_model.bin")
    err = one_line_exit_2(["profile", "--model", str(hf_dir)], capsys)
    assert "pickles only (pytorch_model.bin), which prunekit never unpickles" in err
    assert not witness.exists()


@pytest.mark.parametrize("seed", [0, 1, 2, 4, 5])  # flips that broke the reader
def test_a_garbage_checkpoint_is_a_checkpoint_error(tmp_path: Path, seed: int, capsys) -> None:
    model = zoo.build_model("lenet300", in_features=20)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    data = bytearray((tmp_path / "w.pt").read_bytes())
    g = torch.Generator().manual_seed(seed)
    for i in torch.randint(0, 120, (3,), generator=g).tolist():  # the zip's first header
        data[i] ^= 0xFF
    (tmp_path / "w.pt").write_bytes(bytes(data))
    before = snapshot(model)
    try:
        model_spec.load_checkpoint(model, tmp_path / "w.pt", "lenet300")
    except CheckpointError:
        assert_unchanged(model, before)
    argv = ["profile", "--model", "lenet300", "--checkpoint", str(tmp_path / "w.pt")]
    assert main([*argv, "--model-kwargs", '{"in_features": 20}']) in (0, 2)
    assert "Traceback" not in capsys.readouterr().err


def test_a_file_system_refusal_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("not a folder")
    argv = [
        "export",
        "--model",
        "lenet5",
        "--out",
        str(tmp_path / "file"),
        "--format",
        "safetensors",
    ]
    assert str(tmp_path / "file") in one_line_exit_2(argv, capsys)


def test_example_check_leaves_the_model_as_it_was(factory: str) -> None:
    from prunekit import cli_model

    loaded = model_spec.load_model(f"{factory}:mlp")
    before = snapshot(loaded.model)
    with pytest.raises(InvalidInputsError):
        cli_model.check_example(loaded, torch.randn(1, 3))
    cli_model.check_example(loaded, torch.randn(1, 64))
    assert_unchanged(loaded.model, before)
