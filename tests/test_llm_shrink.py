"""pk.llm.shrink: width + depth pruning to a standard config that plain transformers loads."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, snapshot

import prunekit as pk
from prunekit.errors import (
    CalibrationError,
    IncompatibleLayerError,
    MissingDataError,
    PruningError,
    UnknownChoiceError,
)

transformers = pytest.importorskip("transformers")
VOCAB = 64


def tiny(arch: str, layers: int = 4) -> torch.nn.Module:
    """A tiny random causal LM of ``arch`` (GQA: 4 query heads on 2 KV heads)."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "mistral": lambda: transformers.MistralConfig(**common),
        "gemma": lambda: transformers.GemmaConfig(head_dim=8, **common),
        "gemma2": lambda: transformers.Gemma2Config(head_dim=8, **common),
        "gemma3": lambda: transformers.Gemma3TextConfig(head_dim=8, **common),
        "gpt2": lambda: transformers.GPT2Config(
            n_embd=32, n_head=4, n_layer=layers, vocab_size=VOCAB, n_positions=64
        ),
    }
    return transformers.AutoModelForCausalLM.from_config(configs[arch]()).eval()


def ids(samples: int = 4, seq_len: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(seed)
    )


ARCHS = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3", "gpt2"]
WIDTH = {  # every axis narrows; GPT-2 ties hidden to heads x head_dim
    "gpt2": dict(heads=2, hidden=16, intermediate=40),
}
DEFAULT_WIDTH = dict(heads=2, kv_heads=1, intermediate=40, hidden=24)

RELOAD = """
import json, sys, torch, transformers
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    x = torch.load(path + "/ids.pt")
    with torch.no_grad():
        out[name] = model(x).logits.tolist()
assert not any(m.startswith("prunekit") for m in sys.modules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every architecture shrunk in width and depth, saved; logits before saving."""
    saved = {}
    for arch in ARCHS:
        model = tiny(arch)
        result = pk.llm.shrink(model, data=ids(), drop_layers=1, **WIDTH.get(arch, DEFAULT_WIDTH))
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        torch.save(ids(2, 10, seed=5), path / "ids.pt")
        with torch.no_grad():
            logits = model(ids(2, 10, seed=5)).logits
        saved[arch] = (model, result, str(path), logits)
    return saved


def test_plain_transformers_reloads_every_architecture_with_identical_logits(shrunk) -> None:
    paths = {arch: path for arch, (_, _, path, _) in shrunk.items()}
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, json.dumps(paths)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    reloaded = json.loads(done.stdout.strip().splitlines()[-1])
    for arch, (_, _, _, logits) in shrunk.items():
        torch.testing.assert_close(torch.tensor(reloaded[arch]), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_result_and_config_state_the_new_shape(shrunk, arch: str) -> None:
    model, result, path, _ = shrunk[arch]
    config = json.loads((Path(path) / "config.json").read_text())
    want = WIDTH.get(arch, DEFAULT_WIDTH)
    assert result.after.heads == want["heads"] and result.after.hidden == want["hidden"]
    assert len(result.dropped_layers) == 1 and result.params_after == pk.llm.anatomy.param_count(
        model
    )
    assert result.params_after < result.params_before
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    assert layers == 3
    if arch != "gpt2":
        assert config["head_dim"] == 8 and config["num_key_value_heads"] == 1
        assert config["intermediate_size"] == 40
        for index, block in enumerate(model.model.layers):
            assert block.self_attn.layer_idx == index
    else:
        assert config["n_inner"] == 40 and config["n_embd"] == 16 and config["n_head"] == 2
    if "layer_types" in config:
        assert len(config["layer_types"]) == 3
    assert len(result.removed_hidden) == 32 - want["hidden"]


def test_tied_embeddings_stay_tied() -> None:
    model = tiny("gemma")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    pk.llm.shrink(model, data=ids(), hidden=16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.shape == (VOCAB, 16)


def test_gemma_embedding_scale_is_folded_into_the_tied_embedding_and_final_norm() -> None:
    """Gemma multiplies embeddings by sqrt(hidden_size), which a reload recomputes from the
    new size: the residual stream and the head (tied) must still see the old scale."""
    model = tiny("gemma2")
    x = ids()
    reference = copy.deepcopy(model)
    result = pk.llm.shrink(model, importance="magnitude", hidden=24)
    kept = [i for i in range(32) if i not in result.removed_hidden]
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(24**0.5)
    torch.testing.assert_close(
        model.model.embed_tokens(x), reference.model.embed_tokens(x)[..., kept]
    )
    old_norm = reference.model.norm
    narrow = type(old_norm)(24, eps=old_norm.eps)
    narrow.weight.data = old_norm.weight.data[kept]
    h = torch.randn(2, 5, 24)
    want = narrow(h) @ reference.lm_head.weight[:, kept].T
    torch.testing.assert_close(model.lm_head(model.model.norm(h)), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_renumbered_layers_generate_with_the_kv_cache(arch: str) -> None:
    model = tiny(arch, layers=4)
    pk.llm.drop_layers(model, [0, 2])
    prompt = ids(2, 6)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
        full = model(cached).logits[:, prompt.shape[1] - 1 : -1]
        steps = model.generate(
            prompt,
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        ).logits
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)


def test_drop_layers_renumbers_per_layer_config_lists_and_the_cache() -> None:
    """(Gemma 2's cached decoding differs from a full forward by itself, dropped or not, so
    the cache is checked by its layers, not by logits.)"""
    model = tiny("gemma2", layers=4)
    types = list(model.config.layer_types)
    removed = pk.llm.drop_layers(model, [3, 1])
    assert removed == (1, 3)
    assert model.config.layer_types == [types[0], types[2]]
    assert model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    out = model.generate(ids(1, 6), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    assert len(cache.layers) == 2 and out.sequences.shape == (1, 9)


def test_target_params_keeps_the_fraction_and_plan_predicts_it_exactly() -> None:
    model = tiny("llama")
    planned = pk.llm.plan_shrink(model, target_params=0.5)
    result = pk.llm.shrink(model, data=ids(), target_params=0.5)
    assert result.params_after == planned.params_after <= 0.5 * result.params_before
    assert result.params_after > 0.4 * result.params_before
    assert result.after == planned.after and len(result.dropped_layers) == planned.drop


def test_depth_fraction_zero_is_width_only_and_one_is_mostly_depth() -> None:
    width = pk.llm.plan_shrink(tiny("llama", layers=8), target_params=0.6, depth_fraction=0.0)
    depth = pk.llm.plan_shrink(tiny("llama", layers=8), target_params=0.6, depth_fraction=1.0)
    assert width.drop == 0 and width.after.hidden < 32
    assert depth.drop >= 2 and depth.after.hidden >= width.after.hidden


BAD = [
    (dict(heads=5), PruningError, "heads=5 is more than"),
    (dict(heads=3, kv_heads=2), PruningError, "multiple of kv_heads"),
    (dict(heads=4, kv_heads=1), PruningError, "at most 2"),
    (dict(drop_layers=[0, 9]), PruningError, "drop_layers=[0, 9]"),
    (dict(drop_layers=4), PruningError, "leaving at least one"),
    (dict(target_params=0.01), PruningError, "cannot be reached"),
    (dict(target_params=0.5, heads=2), PruningError, "one or the other"),
    (dict(importance="wanda"), UnknownChoiceError, "width importance"),
    (dict(heads=0), PruningError, "ShrinkSettings.heads=0"),
    (dict(hidden=16), MissingDataError, "Fix: pass data="),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD)
def test_bad_settings_raise_before_anything_changes(kwargs, error, message) -> None:
    model = tiny("llama")
    before = snapshot(model)
    config = copy.deepcopy(model.config.to_dict())
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        pk.llm.shrink(model, **kwargs)
    assert_unchanged(model, before)
    assert model.config.to_dict() == config


def test_bad_calibration_data_leaves_the_model_unchanged() -> None:
    model = tiny("llama")
    before = snapshot(model)
    with pytest.raises(CalibrationError):
        pk.llm.shrink(model, data=ids() + VOCAB, hidden=16)
    assert_unchanged(model, before)


def test_gpt2_hidden_must_match_its_heads() -> None:
    model = tiny("gpt2")
    before = snapshot(model)
    with pytest.raises(PruningError, match="n_embd = n_head x 8"):
        pk.llm.shrink(model, importance="magnitude", heads=2, hidden=24)
    assert_unchanged(model, before)


@pytest.mark.parametrize("arch", ["bert", "opt"])
def test_other_architectures_are_refused_by_name(arch: str) -> None:
    if arch == "bert":
        model = transformers.BertModel(
            transformers.BertConfig(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=32,
                vocab_size=VOCAB,
            )
        )
    else:
        model = transformers.OPTForCausalLM(
            transformers.OPTConfig(
                hidden_size=32,
                num_hidden_layers=1,
                ffn_dim=32,
                num_attention_heads=4,
                vocab_size=VOCAB,
            )
        )
    before = snapshot(model)
    with pytest.raises(IncompatibleLayerError, match=f"model_type '{arch}'"):
        pk.llm.shrink(model, importance="magnitude", heads=2)
    assert_unchanged(model, before)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
def test_a_shrunk_model_distils_towards_its_unpruned_teacher(shrunk, arch: str) -> None:
    from prunekit.training.distill import kl_divergence

    student, teacher = copy.deepcopy(shrunk[arch][0]), tiny(arch)
    data = list(ids(16, 12, seed=3).split(4))
    before = kl_divergence(student, teacher, data)
    report = pk.training.distill(student, teacher, data, steps=12, lr=1e-3, progress=False)
    assert report.steps == 12
    assert kl_divergence(student, teacher, data) < 0.75 * before
