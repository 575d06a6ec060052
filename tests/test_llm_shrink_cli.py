"""``prunekit llm shrink``: a smaller dense checkpoint that plain transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_llm_cli import run_cli

from prunekit.errors import PruningError, UsageError
from prunekit.zoo import lm

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo char Llama's recipe at toy size (2 blocks, hidden 32, 8 query / 4 KV heads),
    untrained: shrinking needs no trained weights."""
    directory = tmp_path_factory.mktemp("char-llama")
    tokenizer = lm.CharTokenizer.from_text(lm.corpus())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(lm.lm_config(tokenizer.vocab_size, hidden=32, layers=2))
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory


def params(path: Path) -> int:
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def test_cli_shrink_to_half_the_parameters_writes_a_plain_checkpoint(
    tiny_lm: Path, tmp_path: Path
) -> None:
    out = tmp_path / "small"
    argv = ["llm", "shrink", "--model", str(tiny_lm), "--target-params", "0.5"]
    text = run_cli([*argv, "--samples", "4", "--seq-len", "32", "--out", str(out)])
    assert "shrunk (activation)" in text and "plain from_pretrained" in text
    assert params(out) <= 0.5 * params(tiny_lm)
    record = json.loads((out / "prunekit_shrink.json").read_text())
    assert record["settings"]["target_params"] == 0.5
    assert record["result"]["params_after"] == params(out)
    assert (out / lm.VOCAB_FILE).exists()


def test_cli_shrink_explicit_sizes_from_a_text_file(tiny_lm: Path, tmp_path: Path) -> None:
    text_file = tmp_path / "calibration.txt"
    text_file.write_text(lm.split_text()[0][:3000])
    out = tmp_path / "narrow"
    sizes = ["--heads", "4", "--kv-heads", "2", "--hidden", "24", "--drop-layers", "1"]
    data = ["--calibration", str(text_file), "--samples", "2", "--seq-len", "16"]
    argv = ["llm", "shrink", "--model", str(tiny_lm), *sizes, "--importance", "taylor"]
    run_cli([*argv, *data, "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (24, 1, 4)


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (["--drop-layers", "two"], UsageError, "--drop-layers 'two'"),
        (["--calibration", "/nonexistent.txt", "--hidden", "16"], UsageError, "--calibration"),
        ([], UsageError, "nothing to remove"),
        (["--device", "cuda:7"], UsageError, "--device"),
        (["--heads", "3"], PruningError, "multiple of kv_heads"),
    ],
)
def test_cli_shrink_errors_write_nothing(
    tiny_lm: Path, tmp_path: Path, extra: list[str], error: type, message: str
) -> None:
    out = tmp_path / "never"
    with pytest.raises(error, match=message):
        run_cli(["llm", "shrink", "--model", str(tiny_lm), *extra, "--out", str(out)])
    assert not out.exists()
