"""Distillation (pk.training.distill): the loss, the KL it lowers, entry checks that leave the
student bit-identical, and resuming from its checkpoints."""

from __future__ import annotations

import argparse
import copy
import json
import re
from io import StringIO
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, snapshot
from rich.console import Console
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import prunekit as pk
from prunekit import cli_llm, recipes
from prunekit.errors import (
    CheckpointError,
    PruningError,
    RecipeError,
    UnknownChoiceError,
    UsageError,
)
from prunekit.recipes import distill as recipe_distill
from prunekit.training.distill import (
    Distillation,
    DistillStep,
    Steps,
    kl_divergence,
    next_token_loss,
)
from prunekit.zoo import lm

VOCAB = 32


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def batches(count: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 16), generator=g) for _ in range(count)]


def test_distillation_lowers_kl_to_the_teacher() -> None:
    teacher, student = tiny_llama(0), tiny_llama(1, hidden=16, layers=1)
    data = batches()
    before = kl_divergence(student, teacher, data)
    report = pk.training.distill(student, teacher, data, steps=40, lr=1e-2, progress=False)
    after = kl_divergence(student, teacher, data)
    assert after < 0.5 * before
    assert report.steps == 40 and report.tokens == 40 * 4 * 16
    assert len(report.losses) == 1


def test_student_equal_to_teacher_has_zero_kl_loss() -> None:
    teacher = tiny_llama(0)
    student = copy.deepcopy(teacher)
    step = DistillStep(teacher, Distillation(temperature=2.0))
    assert step(student, batches(1)[0]).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(student, teacher, batches(2)) == pytest.approx(0.0, abs=1e-6)


def test_hidden_and_task_terms_on_gpt2_with_padding() -> None:
    teacher, student = tiny_gpt2(0), tiny_gpt2(1)
    ids = batches(1)[0]
    mask = torch.ones_like(ids)
    mask[:, -4:] = 0
    data = [{"input_ids": ids, "attention_mask": mask, "labels": ids}]
    cfg = Distillation(steps=3, alpha=0.5, hidden=0.1, temperature=2.0)
    loss = DistillStep(teacher, cfg)(student, data[0])
    assert loss.requires_grad and loss.item() > 0
    report = pk.training.distill(student, teacher, data, cfg, progress=False)
    assert report.tokens == 3 * ids.numel()
    same = DistillStep(teacher, cfg)(copy.deepcopy(teacher), data[0]).item()
    logits = teacher(input_ids=ids, attention_mask=mask).logits
    assert same == pytest.approx(0.5 * next_token_loss(logits, data[0]).item(), rel=1e-5)


def test_teacher_is_left_unchanged_and_in_its_mode() -> None:
    teacher, student = tiny_llama(0), tiny_llama(1)
    teacher.train()
    before = snapshot(teacher)
    pk.training.distill(student, teacher, batches(), steps=3, progress=False)
    assert_unchanged(teacher, before)


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"steps": 0}, PruningError, "Distillation.steps=0"),
        ({"temperature": 0.0}, PruningError, "Distillation.temperature=0.0"),
        ({"alpha": 1.5}, PruningError, "Distillation.alpha=1.5"),
        ({"lr": -1.0}, PruningError, "Distillation.lr=-1.0"),
        ({"every": 0}, PruningError, "Distillation.every=0"),
        ({"optimizer": "lion"}, UnknownChoiceError, "lion"),
        ({"temprature": 2.0}, PruningError, "unknown distillation setting"),
        ({"hidden": 1.0}, PruningError, "widths are 16 (student) and 32 (teacher)"),
        ({"task": 3}, PruningError, "is not callable"),
    ],
)
def test_bad_settings_fail_at_entry_student_bit_identical(options, error, words) -> None:
    teacher, student = tiny_llama(0), tiny_llama(1, hidden=16)
    before = snapshot(student)
    with pytest.raises(error, match=re.escape(words)):
        pk.training.distill(student, teacher, batches(), progress=False, **options)
    assert_unchanged(student, before)


def test_bad_models_and_data_fail_at_entry() -> None:
    teacher = tiny_llama(0)
    before = snapshot(teacher)
    with pytest.raises(PruningError, match=r"share \d+ parameter tensor"):
        pk.training.distill(teacher, teacher, batches(), progress=False)
    with pytest.raises(PruningError, match="not a re-iterable"):
        pk.training.distill(tiny_llama(1), teacher, iter(batches()), progress=False)
    with pytest.raises(PruningError, match="vocab_size"):
        other = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2))
        pk.training.distill(other, teacher, batches(), progress=False)
    with pytest.raises(PruningError, match="yielded no batch"):
        pk.training.distill(tiny_llama(1), teacher, [], steps=2, progress=False)
    with pytest.raises(PruningError, match="neither a"):
        pk.training.distill(tiny_llama(1), teacher, [[1, 2, 3]], steps=1, progress=False)
    assert_unchanged(teacher, before)


def test_steps_cycle_the_data() -> None:
    data = batches(3)
    window = Steps(data, 2, 7)
    got = list(window)
    assert len(got) == len(window) == 5
    assert [id(b) for b in got] == [id(data[i % 3]) for i in range(2, 7)]


class Flaky(list):
    """Batches that raise on iteration ``fail_at`` (counting every batch drawn)."""

    fail_at: int | None = None
    drawn = 0

    def __iter__(self):
        for batch in super().__iter__():
            if self.fail_at is not None and Flaky.drawn >= self.fail_at:
                raise KeyboardInterrupt
            Flaky.drawn += 1
            yield batch


def test_resumed_run_ends_as_an_uninterrupted_one(tmp_path) -> None:
    teacher = tiny_llama(0)
    options = dict(steps=6, every=2, lr=1e-2, progress=False)
    whole = tiny_llama(1)
    full = pk.training.distill(
        whole, teacher, Flaky(batches()), checkpoint_dir=tmp_path / "a", **options
    )
    cut, data = tiny_llama(1), Flaky(batches())
    data.fail_at, Flaky.drawn = 8, 0  # chunks draw 2, 4, then 6 batches (from the first)
    with pytest.raises(KeyboardInterrupt):
        pk.training.distill(cut, teacher, data, checkpoint_dir=tmp_path / "b", **options)
    data.fail_at = None
    again = tiny_llama(1)
    resumed = pk.training.distill(again, teacher, data, checkpoint_dir=tmp_path / "b", **options)
    assert resumed.losses == full.losses and len(resumed.losses) == 3
    assert resumed.tokens == 2 * 4 * 16  # only the last chunk trained in this call
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


def test_checkpoint_of_another_run_is_refused(tmp_path) -> None:
    teacher = tiny_llama(0)
    pk.training.distill(tiny_llama(1), teacher, batches(), steps=2, every=1,
                        checkpoint_dir=tmp_path, progress=False)  # fmt: skip
    student = tiny_llama(1)
    before = snapshot(student)
    with pytest.raises(CheckpointError):
        pk.training.distill(student, teacher, batches(), steps=2, every=1, lr=0.5,
                            checkpoint_dir=tmp_path, progress=False)  # fmt: skip
    assert_unchanged(student, before)


@pytest.fixture(scope="module")
def char_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A teacher and a narrower student char Llama, each trained a few steps (about 1 s)."""
    root = tmp_path_factory.mktemp("char")
    common = dict(batch_size=2, seq_len=32, layers=1, progress=False)
    lm.build_lm(root / "teacher", steps=3, hidden=32, **common)
    lm.build_lm(root / "student", steps=1, hidden=16, **common)
    return root / "teacher", root / "student"


def run_llm(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="prunekit")
    cli_llm.add_parser(parser.add_subparsers(dest="command", required=True))
    out = StringIO()
    cli_llm.run(parser.parse_args(["llm", *argv]), Console(file=out, width=200))
    return out.getvalue()


def test_cli_distill_writes_a_checkpoint_plain_transformers_loads(char_models, tmp_path) -> None:
    teacher, student = char_models
    out = tmp_path / "kd"
    argv = ["distill", "--student", str(student), "--teacher", str(teacher), "--steps", "3"]
    text = run_llm([*argv, "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "512",
                    "--out", str(out)])  # fmt: skip
    assert "distilled 3 steps (192 tokens)" in text and "held-out perplexity" in text
    record = json.loads((out / "prunekit_distill.json").read_text())
    assert len(record["losses"]) == 1 and record["tokens"] == 192
    loaded = LlamaForCausalLM.from_pretrained(out)  # plain transformers, no prunekit
    before = LlamaForCausalLM.from_pretrained(student)
    assert loaded.config.hidden_size == 16 and (out / lm.VOCAB_FILE).exists()
    assert not torch.equal(loaded.model.embed_tokens.weight, before.model.embed_tokens.weight)


def test_cli_distill_takes_module_function_data(char_models, tmp_path, monkeypatch) -> None:
    teacher, student = char_models
    (tmp_path / "kd_data.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    return (torch.randint(0, 10, (2, 8)) for _ in range(100))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "kd"
    text = run_llm(["distill", "--student", str(student), "--teacher", str(teacher),
                    "--data", "kd_data:batches", "--steps", "2", "--eval-tokens", "512",
                    "--out", str(out)])  # fmt: skip
    assert "distilled 2 steps (32 tokens)" in text


@pytest.mark.parametrize(
    ("extra", "error", "words"),
    [
        (["--data", "nonsense"], UsageError, "neither 'pydoc' nor module:function"),
        (["--data", "no_such_module_kd:f"], UsageError, "ModuleNotFoundError"),
        (["--steps", "0"], PruningError, "Distillation.steps=0"),
        (["--alpha", "2"], PruningError, "Distillation.alpha=2.0"),
        (["--batch-size", "0"], UsageError, "--batch-size 0 is too small"),
    ],
)
def test_cli_distill_bad_options_write_nothing(char_models, tmp_path, extra, error, words) -> None:
    teacher, student = char_models
    out = tmp_path / "kd"
    argv = ["distill", "--student", str(student), "--teacher", str(teacher), "--out", str(out)]
    with pytest.raises(error, match=re.escape(words)):
        run_llm([*argv, *extra])
    assert not out.exists()


RECIPE = """name: kd
kind: llm
model: char-llama
llm: {method: wanda, sparsity: 0.5, samples: 4, seq_len: 32}
distill:
  steps: 3
  lr: 0.01
  batch_size: 2
"""


def test_recipe_distill_section_is_checked_at_its_line() -> None:
    recipe = recipes.loads(RECIPE, "kd.yaml")
    assert recipe_distill.settings(recipe) == Distillation(steps=3, lr=0.01)
    assert recipe_distill.settings(recipes.loads(RECIPE.split("distill:")[0])) is None
    cases = [
        ("  lr: 0.01", "  lr: -1", "kd.yaml:7: distill.lr = -1 must be > 0"),
        ("  steps: 3", "  steps: 0", "kd.yaml:6: distill.steps = 0 is not an int >= 1"),
        ("  lr: 0.01", "  alpha: 2", "kd.yaml:7: distill.alpha = 2 must be <= 1"),
        ("  lr: 0.01", "  temprature: 2", "kd.yaml:7: unknown key 'distill.temprature'; "
                                           "Fix: did you mean 'temperature'?"),
        ("  lr: 0.01", "  every: 2", "kd.yaml:7: unknown key 'distill.every'"),
        ("  batch_size: 2", "  batch_size: 0", "kd.yaml:8: distill.batch_size = 0 must be >= 1"),
    ]  # fmt: skip
    for old, new, message in cases:
        with pytest.raises(RecipeError) as info:
            recipes.loads(RECIPE.replace(old, new), "kd.yaml")
        assert str(info.value).startswith(message), str(info.value)


def test_recipe_distill_section_needs_kind_llm() -> None:
    text = "name: p\nmodel: lenet5\ndata: {dataset: digits}\nprune: {sparsity: 0.5}\ndistill: {}\n"
    with pytest.raises(RecipeError, match=r"p.yaml:5: distill = \{\} does not apply to kind"):
        recipes.loads(text, "p.yaml")


@pytest.mark.slow  # trains the --quick char Llama, then prunes and distils it
def test_recipe_prunes_then_distills_keeping_the_zeros(tmp_path) -> None:
    console = Console(file=StringIO(), width=160)
    recipe = recipes.loads(RECIPE + "export: {formats: [safetensors]}\n")
    folder = recipes.run(recipe, out_dir=tmp_path, quick=True, console=console)
    results = json.loads((folder / "results.json").read_text())
    section = next(s for s in results["sections"] if s["heading"] == "Perplexity")
    assert [row["model"] for row in section["rows"]][2].endswith("+ distilled")
    assert all(row["perplexity"] > 1 for row in section["rows"])
    assert "Distilled from the dense model on 3 batches of 2 x 32" in section["text"]
    model = LlamaForCausalLM.from_pretrained(folder / "model")  # masks baked after distilling
    for layer in model.model.layers:
        for linear in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert (linear.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
