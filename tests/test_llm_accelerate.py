"""``pk.llm.prune`` on a model whose blocks accelerate offloads to disk: the same bits as
in memory, ``save_pretrained`` round trip, all-or-nothing on error (model as it was)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from prunekit import llm
from prunekit.errors import IncompatibleLayerError, InvalidWeightError
from prunekit.llm import methods

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

DEVICE_MAP = {
    "model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
    "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
}  # fmt: skip
IDS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    tiny_llama(blocks=3).save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def offloaded(checkpoint: Path, device_map: dict[str, str] = DEVICE_MAP) -> torch.nn.Module:
    """Block 0 resident on the CPU, the others and the embedding on disk (by default)."""
    folder = checkpoint.parent / "offload"
    return transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map=device_map, offload_folder=folder
    )


def digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offloaded_model_prunes_to_the_in_memory_bits(checkpoint: Path, method: str) -> None:
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    model = offloaded(checkpoint)
    source = digest(checkpoint)
    assert model.model.layers[1].mlp.up_proj.weight.is_meta
    expected = llm.prune(reference, IDS, method=method, sparsity=0.5, progress=False)
    report = llm.prune(model, IDS, method=method, sparsity=0.5, progress=False)
    assert [r.sparsity for r in report.layers] == [r.sparsity for r in expected.layers]
    assert [r.error for r in report.layers] == pytest.approx([r.error for r in expected.layers])
    assert model.model.layers[1].mlp.up_proj.weight.is_meta  # offloaded again
    assert torch.allclose(logits(model), logits(reference), atol=1e-6)
    model.save_pretrained(checkpoint.parent / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(checkpoint.parent / "out")
    state = reference.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert digest(checkpoint) == source  # the source checkpoint is never written
    assert not list((checkpoint.parent / "offload").glob("*.prunekit"))  # staging gone


def snapshot(model: torch.nn.Module, checkpoint: Path) -> tuple:
    hooks = [m._hf_hook for m in model.modules() if getattr(m, "_hf_hook", None) is not None]
    index = next(h.weights_map.dataset.index for h in hooks if h.weights_map is not None)
    metas = [n for n, p in model.named_parameters() if p.is_meta]
    offload = [getattr(h, "offload", None) for h in hooks]
    return json.dumps(index, sort_keys=True), metas, offload, digest(checkpoint.parent / "offload")


@pytest.mark.parametrize(
    ("options", "message"),
    [({"keep_masks": True}, "keep_masks=True"), ({"allocation": "owl"}, "allocation='owl'")],
)
def test_what_an_offloaded_model_cannot_do_is_refused_first(
    checkpoint: Path, options: dict, message: str
) -> None:
    model = offloaded(checkpoint)
    before, out = snapshot(model, checkpoint), logits(model)
    with pytest.raises(IncompatibleLayerError, match=message):
        llm.prune(model, IDS, method="wanda", sparsity=0.5, progress=False, **options)
    assert snapshot(model, checkpoint) == before and torch.equal(logits(model), out)


def test_a_failure_in_a_later_block_leaves_the_model_as_it_was(checkpoint: Path, monkeypatch):
    """Every block offloaded: all or nothing (a resident block is pruned in place, as in
    memory)."""
    model = offloaded(checkpoint, DEVICE_MAP | {"model.layers.0": "disk"})
    before, out = snapshot(model, checkpoint), logits(model)
    real = methods.solve

    def failing(method, weight, target, stats, name, **kwargs):
        if name.startswith("model.layers.2."):
            raise RuntimeError("boom")
        return real(method, weight, target, stats, name, **kwargs)

    monkeypatch.setattr(methods, "solve", failing)
    with pytest.raises(RuntimeError, match="boom"):
        llm.prune(model, IDS, method="sparsegpt", sparsity=0.5, progress=False)
    assert snapshot(model, checkpoint) == before
    assert torch.equal(logits(model), out)


def test_a_nan_in_an_offloaded_block_is_named_and_nothing_changes(checkpoint: Path) -> None:
    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    model = offloaded(checkpoint)
    before = snapshot(model, checkpoint)
    with pytest.raises(InvalidWeightError, match=r"model\.layers\.2\.mlp\.down_proj"):
        llm.prune(model, IDS, method="wanda", sparsity=0.5, progress=False)
    assert snapshot(model, checkpoint) == before


def in_memory_bits(checkpoint: Path, out: Path, **options) -> dict[str, torch.Tensor]:
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    llm.prune(reference, IDS, progress=False, **options)
    return reference.state_dict()


def assert_saved_equal(model: torch.nn.Module, out: Path, expected: dict) -> None:
    model.save_pretrained(out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert back.keys() == expected.keys()
    for name, tensor in back.items():
        assert torch.equal(tensor, expected[name]), name


def test_offloaded_fused_moe_experts_are_written_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "mixtral", hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, num_hidden_layers=2, num_experts_per_tok=2,
        num_local_experts=4,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk",
                  "model.layers.1": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}  # fmt: skip
    model = offloaded(tmp_path / "src", device_map)
    expected = in_memory_bits(tmp_path / "src", tmp_path, method="wanda", sparsity=0.5)
    llm.prune(model, IDS, method="wanda", sparsity=0.5, progress=False)
    stored = model.model.layers[0].mlp.experts._hf_hook.weights_map["down_proj"]
    assert float((stored == 0).float().mean()) == pytest.approx(0.5)
    assert_saved_equal(model, tmp_path / "out", expected)


def test_accelerate_preloaded_submodules_prune_like_in_memory(checkpoint: Path) -> None:
    from accelerate import disk_offload

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    disk_offload(model, checkpoint.parent / "offload", preload_module_classes=["LlamaMLP"])
    expected = in_memory_bits(checkpoint, checkpoint.parent, method="sparsegpt", sparsity=0.5)
    llm.prune(model, IDS, method="sparsegpt", sparsity=0.5, progress=False)
    assert model.model.layers[1].mlp.up_proj.weight.is_meta
    mlp = model.model.layers[1].mlp  # one hook places the MLP's three Linears
    for name in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
        stored = mlp._hf_hook.weights_map[name]
        assert torch.equal(stored, expected[f"model.layers.1.mlp.{name}"]), name


def test_cpu_offload_failure_leaves_accelerates_copies_alone(checkpoint: Path, monkeypatch):
    """``cpu_offload`` keeps CPU tensors that a CPU execution device would share: the loaded
    weights are copies, so baking / in-place SparseGPT never write through."""
    from accelerate import cpu_offload

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    cpu_offload(model)
    up = model.model.layers[0].mlp.up_proj
    stored, out = up._hf_hook.weights_map["weight"].clone(), logits(model)
    monkeypatch.setattr(methods, "solve", failing_in_block(2))
    with pytest.raises(RuntimeError, match="boom"):
        llm.prune(model, IDS, method="sparsegpt", sparsity=0.5, progress=False,
                  measure_error=False)  # fmt: skip
    assert torch.equal(up._hf_hook.weights_map["weight"], stored)
    assert torch.equal(logits(model), out)


def failing_in_block(index: int):
    real = methods.solve

    def failing(method, weight, target, stats, name, **kwargs):
        if name.startswith(f"model.layers.{index}."):
            raise RuntimeError("boom")
        return real(method, weight, target, stats, name, **kwargs)

    return failing


@pytest.mark.parametrize("interrupt_at", [1, 4])
def test_an_interrupted_commit_is_undone(checkpoint: Path, monkeypatch, interrupt_at: int):
    """Pruned once (the offload folder then holds ``.dat`` files), interrupted while the
    second prune moves its files into place: files and index as after the first."""
    from prunekit.llm import accelerated

    model = offloaded(checkpoint, DEVICE_MAP | {"model.layers.0": "disk"})
    llm.prune(model, IDS, method="wanda", sparsity=0.5, progress=False)
    before, out = snapshot(model, checkpoint), logits(model)
    real, calls = accelerated.os.replace, [0]

    def replace(a, b):
        calls[0] += 1
        if calls[0] == interrupt_at:
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(accelerated.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        llm.prune(model, IDS, method="wanda", sparsity=0.7, progress=False)
    monkeypatch.setattr(accelerated.os, "replace", real)
    assert snapshot(model, checkpoint) == before and torch.equal(logits(model), out)
    assert not list((checkpoint.parent / "offload").glob("*.prunekit"))
