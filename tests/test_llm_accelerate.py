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


def offloaded(
    checkpoint: Path, device_map: dict[str, str] = DEVICE_MAP, **options
) -> torch.nn.Module:
    """Block 0 resident on the CPU, the others and the embedding on disk (by default)."""
    folder = checkpoint.parent / "offload"
    return transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map=device_map, offload_folder=folder, **options
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


def test_bfloat16_offloaded_weights_are_written_back_in_accelerates_format(checkpoint: Path):
    """The staged ``.dat`` files and their index entries are accelerate's own (bfloat16
    stored as int16, dtype ``bfloat16``): the hooks load the pruned bf16 weights back."""
    model = offloaded(checkpoint, DEVICE_MAP | {"model.layers.0": "disk"}, dtype=torch.bfloat16)
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    llm.prune(reference, IDS, method="wanda", sparsity=0.5, progress=False)
    llm.prune(model, IDS, method="wanda", sparsity=0.5, progress=False)
    up = model.model.layers[1].mlp.up_proj._hf_hook.weights_map
    index = up.dataset.index["model.layers.1.mlp.up_proj.weight"]
    assert index == {"dtype": "bfloat16", "shape": [64, 32]}
    stored = up["weight"]
    assert stored.dtype == torch.bfloat16
    assert torch.equal(stored, reference.model.layers[1].mlp.up_proj.weight)


def resident(model: torch.nn.Module) -> str:
    """A digest of the names and bits of every tensor held in memory (not on meta)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bits = [n.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            for n, t in tensors if not t.is_meta]  # fmt: skip
    return hashlib.sha256(b"".join(bits)).hexdigest()


def snapshot(model: torch.nn.Module, checkpoint: Path) -> tuple:
    hooks = [m._hf_hook for m in model.modules() if getattr(m, "_hf_hook", None) is not None]
    index = next(h.weights_map.dataset.index for h in hooks if h.weights_map is not None)
    metas = [n for n, p in model.named_parameters() if p.is_meta]
    offload = [getattr(h, "offload", None) for h in hooks]
    folder = digest(checkpoint.parent / "offload")
    return json.dumps(index, sort_keys=True), metas, offload, folder, resident(model)


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


def poison(checkpoint: Path, name: str) -> None:
    """One NaN written into tensor ``name`` of the saved checkpoint."""
    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("placement", "layer"),
    [
        ({}, "model.layers.2.mlp.down_proj"),  # block 0 resident: checked before it is pruned
        ({"model.layers.0": "disk"}, "model.layers.2.mlp.down_proj"),
        ({}, "model.layers.1.self_attn.q_proj"),  # the first offloaded block
        ({}, "model.layers.0.mlp.up_proj"),  # in memory
    ],
)
def test_a_nan_in_an_offloaded_block_is_named_and_nothing_changes(
    checkpoint: Path, placement: dict, layer: str
) -> None:
    poison(checkpoint, f"{layer}.weight")
    model = offloaded(checkpoint, DEVICE_MAP | placement)
    before, up = snapshot(model, checkpoint), model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(InvalidWeightError, match=layer.replace(".", r"\.")):
        llm.prune(model, IDS, method="wanda", sparsity=0.5, progress=False)
    assert snapshot(model, checkpoint) == before
    assert up.is_meta or not bool((up == 0).any())  # the resident block was not pruned


def test_a_nan_in_offloaded_fused_experts_is_named_and_nothing_changes(tmp_path: Path) -> None:
    """Fused experts are checked from their stored values too, before a resident block
    is pruned."""
    mixtral(tmp_path / "src")
    poison(tmp_path / "src", "model.layers.1.block_sparse_moe.experts.2.w2.weight")  # down
    device_map = MOE_MAP | {"model.layers.0": "cpu"}
    model = offloaded(tmp_path / "src", device_map)
    assert model.model.layers[1].mlp.experts.down_proj.is_meta
    before = snapshot(model, tmp_path / "src")
    with pytest.raises(InvalidWeightError, match=r"model\.layers\.1\.mlp\.experts\.down_proj"):
        llm.prune(model, IDS, method="wanda", sparsity=0.5, progress=False)
    assert snapshot(model, tmp_path / "src") == before


def in_memory_bits(checkpoint: Path, **options) -> dict[str, torch.Tensor]:
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    llm.prune(reference, IDS, progress=False, **options)
    return reference.state_dict()


def assert_saved_equal(model: torch.nn.Module, out: Path, expected: dict) -> None:
    model.save_pretrained(out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert back.keys() == expected.keys()
    for name, tensor in back.items():
        assert torch.equal(tensor, expected[name]), name


MOE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
           "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip


def mixtral(folder: Path) -> None:
    """A seeded two-block Mixtral with fused experts saved to ``folder``."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "mixtral", hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, num_hidden_layers=2, num_experts_per_tok=2,
        num_local_experts=4,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def test_offloaded_fused_moe_experts_are_written_back(tmp_path: Path) -> None:
    mixtral(tmp_path / "src")
    model = offloaded(tmp_path / "src", MOE_MAP)
    expected = in_memory_bits(tmp_path / "src", method="wanda", sparsity=0.5)
    llm.prune(model, IDS, method="wanda", sparsity=0.5, progress=False)
    stored = model.model.layers[0].mlp.experts._hf_hook.weights_map["down_proj"]
    assert float((stored == 0).float().mean()) == pytest.approx(0.5)
    assert_saved_equal(model, tmp_path / "out", expected)


def test_accelerate_preloaded_submodules_prune_like_in_memory(checkpoint: Path) -> None:
    from accelerate import disk_offload

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    disk_offload(model, checkpoint.parent / "offload", preload_module_classes=["LlamaMLP"])
    expected = in_memory_bits(checkpoint, method="sparsegpt", sparsity=0.5)
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
