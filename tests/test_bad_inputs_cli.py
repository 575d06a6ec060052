"""Every option of every CLI subcommand, fuzzed with values of the wrong kind: the command
exits 0 or exits 2 with one line on stderr (``error: ...``, no traceback) that names the
value or the option; a value no correct command line takes exits 2. A real
``python -m prunekit`` process shows the same, and hostile recipe and checkpoint files
through the CLI never get unpickled or run."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_bad_inputs import EXAMPLES, bounded, time_limit

from prunekit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = st.text(st.characters(codec="ascii", categories=["L", "N", "P", "S"]), max_size=8)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _not_fraction(text: str) -> bool:
    value = _number(text)
    return value is None or not 0 <= value < 1


def _not_count(text: str) -> bool:
    return not re.fullmatch(r"\s*\+?\d+\s*", text) or int(text) > 2**63 - 1


FRACTION = st.sampled_from(["nan", "inf", "-1", "1", "1.5", "1e999", "", "½", "1,5"]) | WORDS
BAD_FRACTION = FRACTION.filter(_not_fraction)
BAD_COUNT = (st.sampled_from(["-1", "1.5", "", str(2**63), "1e3", "0x10"]) | WORDS).filter(
    _not_count
)
BAD_LIST = st.sampled_from(["", ",", "a,b", "nan", "1.5", "0.5;0.9", "-0.1"])
NAMES = st.sampled_from(["", "nope", "magnitud", "Element ", "2:3", "block:0x0", "9:4", "0:4"])
BAD_SHAPE = st.sampled_from(["0", "-1,3", "a,b", "1,,2", "1e9,1e9", "1;2", "[1,2]", "0,784"])
BAD_JSON = st.sampled_from(["{", "[]", "null", '{"nope": 1}', '{"in_features": -1}', '"s"'])
BAD_MODEL = st.sampled_from(
    ["", "nope", "builtins:print", "os:getcwd", "json:loads", "math:pi", "no_such_module_xyz:f",
     "prunekit:nope", "/nonexistent/model/dir", "a:b:c"]
)  # fmt: skip


def _files() -> st.SearchStrategy:
    return st.sampled_from(["missing.pt", "folder", "text.safetensors", "evil.pt", "/dev/null"])


LOG_LINE = re.compile(r"\d\d:\d\d:\d\d (?!error:)")


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of ``prunekit argv`` (in this process); a code other than 0
    or 2, or a stderr that is not one ``error:`` line, fails."""
    with time_limit():
        code = main(argv)
    err = capsys.readouterr().err.strip()
    # Progress records of the "prunekit" logger (timestamped, before a late refusal such as
    # an unmeetable --target) are not part of the error.
    err = "\n".join(x for x in err.splitlines() if not LOG_LINE.match(x))
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("error: "), err
    return code, err


ALIASES = {"--model-kwargs": "kwargs"}  # what a message may call an option


def names(err: str, value: str, option: str) -> bool:
    """Whether the error line names ``value`` (spaces collapsed, or its repr) or ``option``."""
    shown = " ".join(value.split())
    if (shown and shown in err) or repr(value) in err:
        return True
    return option.lstrip("-") in err or ALIASES.get(option, option) in err


def _setup(folder: Path) -> None:
    """The files the ``_files`` strategy names, in ``folder``."""

    class Plant:
        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(folder / "unpickled"),))

    (folder / "folder").mkdir()
    (folder / "text.safetensors").write_text("not weights")
    torch.save({"w": Plant()}, folder / "evil.pt")
    (folder / "a file").write_text("not a folder")


PRUNE = ["prune", "--model", "lenet300", "--sparsity", "0.5", "--epochs", "0", "--out", "{out}"]
SHRINK = ["shrink", "--model", "lenet5", "--ratio", "0.5", "--out", "{out}"]  # none masked
EXPORT = ["export", "--model", "lenet300", "--format", "safetensors", "--out", "{out}"]
PROFILE = ["profile", "--model", "lenet300"]
SENS = ["sensitivity", "--model", "lenet300", "--dataset", "digits", "--epochs", "0"]
SWEEP = ["sweep", "--model", "lenet300", "--dataset", "digits", "--epochs", "0"]
LLM = ["llm", "prune", "--model", "char-llama", "--out", "{out}/llm"]  # refused before loading
OUT_BAD = st.sampled_from(["{out}/a file", "{out}/a file/sub", "/proc/prunekit-out"])

# (command, option, values, whether every value must be refused)
OPTIONS = [
    (PROFILE, "--model", BAD_MODEL, True),
    (PROFILE, "--model-kwargs", BAD_JSON, True),
    (PROFILE, "--checkpoint", _files(), True),
    (PROFILE, "--input-shape", BAD_SHAPE, True),
    (PRUNE, "--sparsity", BAD_FRACTION, True),
    (PRUNE, "--granularity", NAMES | WORDS, False),
    (PRUNE, "--criterion", NAMES | WORDS, False),
    (PRUNE, "--scope", NAMES | WORDS, False),
    (PRUNE, "--exclude", NAMES | WORDS, False),
    (PRUNE, "--dataset", (NAMES | WORDS).filter(bool), True),
    (PRUNE, "--epochs", BAD_COUNT, True),
    (PRUNE, "--finetune-epochs", BAD_COUNT, True),
    (PRUNE, "--seed", BAD_COUNT, True),
    (PRUNE, "--out", OUT_BAD, True),
    (SHRINK, "--ratio", BAD_FRACTION, True),
    (SHRINK, "--criterion", NAMES | WORDS, False),
    (SHRINK, "--scope", NAMES | WORDS, False),
    (SHRINK, "--round-to", BAD_COUNT, True),
    (SHRINK, "--out", OUT_BAD, True),
    (EXPORT, "--format", NAMES | WORDS, True),
    (EXPORT, "--batch-size", BAD_COUNT, True),
    (EXPORT, "--out", OUT_BAD, True),
    (SENS, "--target", BAD_FRACTION, True),
    (SENS, "--budget", st.sampled_from(["nan", "-1", "inf", "", "x"]), True),
    (SENS, "--sparsities", BAD_LIST, True),
    (SENS, "--seed", BAD_COUNT, True),
    (SWEEP, "--methods", NAMES, True),
    (SWEEP, "--sparsities", BAD_LIST, True),
    (SWEEP, "--seeds", BAD_LIST, True),
    (LLM, "--samples", BAD_COUNT, True),
    (LLM, "--seq-len", BAD_COUNT, True),
    (LLM, "--seed", BAD_COUNT, True),
    (["llm", "eval", "--model", "char-llama"], "--seq-len", BAD_COUNT, True),
    (["llm", "build-lm", "--out", "{out}/lm"], "--steps", BAD_COUNT, True),
    (["demo", "--out", "{out}"], "--seed", BAD_COUNT, True),
]


@pytest.mark.parametrize(
    ("command", "option", "values", "strict"),
    OPTIONS,
    ids=[f"{c[0]}{' ' + c[1] if c[0] == 'llm' else ''} {o}" for c, o, _, _ in OPTIONS],
)
def test_every_option_exits_0_or_2_in_one_line(command, option, values, strict, capsys) -> None:
    @bounded(ci=EXAMPLES)
    @given(value=values)
    def run(value: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            _setup(Path(tmp))
            argv = [a.replace("{out}", tmp) for a in command]
            value = value.replace("{out}", tmp)
            if option == "--checkpoint" and not value.startswith("/"):
                value = str(Path(tmp) / value)
            code, err = cli([*argv, f"{option}={value}"], capsys)
            assert not (Path(tmp) / "unpickled").exists(), "a pickle was unpickled"
        assert code == 2 or not strict, f"{option}={value!r} was accepted"
        assert code == 0 or names(err, value, option), err

    run()


HOSTILE_RECIPES = {
    "python tag": "name: !!python/object/apply:os.mkdir [{marker}]\nmodel: lenet300\n",
    "binary": "\x00\xff\xfe",
    "not a mapping": "- a\n- b\n",
    "unknown key": "name: x\nmodel: lenet300\nevil: 1\n",
}


@pytest.mark.parametrize("recipe", HOSTILE_RECIPES)
def test_hostile_recipes_exit_2_and_run_nothing(recipe: str, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "r.yaml"
    path.write_bytes(HOSTILE_RECIPES[recipe].format(marker=repr(str(marker))).encode("latin-1"))
    code, err = cli(["run", str(path), "--out", str(tmp_path / "runs")], capsys)
    assert code == 2 and "r.yaml" in err and not marker.exists()
    assert not (tmp_path / "runs").exists()
    for path in (tmp_path / "missing.yaml", tmp_path):
        code, err = cli(["run", str(path), "--out", str(tmp_path / "runs")], capsys)
        assert code == 2 and str(path) in err


def test_a_real_process_prints_one_line_and_exits_2() -> None:
    argv = ["prune", "--model", "lenet300", "--sparsity", "nan", "--epochs", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "prunekit", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nan" in lines[0], lines


def test_a_raw_pickle_checkpoint_is_one_line_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"

    class Plant:
        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(marker),))

    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"w": Plant()}, protocol=4))
    argv = ["profile", "--model", "lenet300", "--checkpoint", str(tmp_path / "raw.pt")]
    done = subprocess.run(
        [sys.executable, "-m", "prunekit", *argv], capture_output=True, text=True, timeout=120
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr  # no torch UserWarning
    assert lines[0].startswith("error: ") and "raw.pt" in lines[0] and not marker.exists()
