"""pk.save_shrunk / pk.load_shrunk bring back what shrinking changed beyond sizes: the
nn.MultiheadAttention head-pruning class, approximate mode's narrower LayerNorms, and (a
transformers model) the width written into its config, so from_pretrained rebuilds it.
A layout that contradicts itself there is refused, the model unchanged."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, snapshot
from safetensors.torch import save_file
from torch import nn

import prunekit as pk
from prunekit.errors import CheckpointError, ShrunkLayoutError
from prunekit.inputs import call
from prunekit.masks import get_mask
from prunekit.structured.mha import HeadPrunedMultiheadAttention
from prunekit.zoo import build_model, example_input


class ViT(nn.Module):
    """Patches, two pre-norm nn.TransformerEncoderLayers (nn.MultiheadAttention, 4 heads),
    a final LayerNorm, mean pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, 16, 32) * 0.1)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(2)
        )
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            t = block(t)
        return self.head(self.ln(t).mean(1))


def vit() -> nn.Module:
    torch.manual_seed(0)
    return ViT().eval()


def zoo_vit() -> nn.Module:
    torch.manual_seed(0)
    return build_model("vit").eval()


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def round_trip(make: Callable[[], nn.Module], x, tmp_path: Path, **kwargs) -> nn.Module:
    """Shrink ``make()`` at 0.5, save, load into a fresh ``make()``: identical outputs."""
    small = make()
    pk.shrink(small, x, 0.5, **kwargs)
    pk.save_shrunk(small, tmp_path / "small")
    loaded = pk.load_shrunk(make(), tmp_path / "small")
    with torch.no_grad():
        assert torch.equal(call(loaded, x), call(small, x))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in small.modules()]
    return loaded


def test_a_vit_with_mha_heads_pruned_round_trips(tmp_path: Path) -> None:
    loaded = round_trip(vit, IMAGES, tmp_path)
    attn = loaded.blocks[1].self_attn
    assert isinstance(attn, HeadPrunedMultiheadAttention) and attn.num_heads == 2
    assert attn.in_proj_weight.shape == (48, 32) and not attn._qkv_same_embed_dim
    loaded.train()(IMAGES).sum().backward()  # and it trains


def test_an_approximate_shrink_round_trips(tmp_path: Path) -> None:
    loaded = round_trip(zoo_vit, example_input("vit", 2), tmp_path, approximate=True)
    norms = [m for m in loaded.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and {m.normalized_shape for m in norms} == {(32,)}  # 64 before


def edited(tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    """An approximate zoo ViT's save whose layout went through ``edit``."""
    small = zoo_vit()
    pk.shrink(small, example_input("vit", 2), 0.5, approximate=True)
    pk.save_shrunk(small, tmp_path / "s")
    layout = json.loads((tmp_path / "s" / "shrunk.json").read_text())
    edit(layout)
    (tmp_path / "s" / "shrunk.json").write_text(json.dumps(layout))
    return tmp_path / "s"


def _set(section: str, key: str, value: object) -> Callable[[dict], None]:
    return lambda layout: layout[section].__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (_set("norms", "ln", [16]), CheckpointError, r"norms\['ln'\] = \[16\] but its weight"),
        (_set("norms", "ln", [128]), ShrunkLayoutError, "128 is larger"),
        (_set("norms", "ln", "32"), CheckpointError, "not a list of 1 sizes"),
        (_set("norms", "head", [32]), ShrunkLayoutError, "no LayerNorm / RMSNorm there"),
        (lambda layout: layout.__setitem__("norms", []), CheckpointError, "'norms' = "),
    ],
)
def test_contradicting_norms_are_refused(tmp_path, edit, error, match) -> None:
    path = edited(tmp_path, edit)
    model = zoo_vit()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        pk.load_shrunk(model, path)
    assert_unchanged(model, before)


def test_heads_that_contradict_the_in_projection_are_refused(tmp_path) -> None:
    small = vit()
    pk.shrink(small, IMAGES, 0.5)
    pk.save_shrunk(small, tmp_path / "s")
    file = tmp_path / "s" / "shrunk.json"
    layout = json.loads(file.read_text())
    layout["attributes"]["blocks.0.self_attn"]["num_heads"] = 1
    file.write_text(json.dumps(layout))
    model = vit()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"48 rows, not 3 x num_heads 1 x head_dim 8"):
        pk.load_shrunk(model, tmp_path / "s")
    assert_unchanged(model, before)
    assert type(model.blocks[0].self_attn) is nn.MultiheadAttention


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_transformers_approximate_shrink_reloads_with_from_pretrained(name, tmp_path) -> None:
    T = pytest.importorskip("transformers")
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64)  # fmt: skip
    if name == "vit":
        config = T.ViTConfig(image_size=32, patch_size=8, num_labels=5, **sizes)
        make, x = (lambda: T.ViTForImageClassification(config).eval()), {"pixel_values": IMAGES}
    else:
        config = T.BertConfig(vocab_size=64, num_labels=3, **sizes)
        make = lambda: T.BertForSequenceClassification(config).eval()  # noqa: E731
        x = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}
    torch.manual_seed(0)
    small = make()
    dense = copy.deepcopy(small)
    report = pk.shrink(small, x, 0.5, approximate=True)
    assert "config.hidden_size: 32 -> 16" in report.notes
    assert (small.config.hidden_size, small.config.num_attention_heads) == (16, 2)
    assert pk.save_shrunk(small, tmp_path / "small")  # save_pretrained too
    reloaded = type(small).from_pretrained(tmp_path / "small").eval()
    loaded = pk.load_shrunk(dense, tmp_path / "small")
    with torch.no_grad():
        want = small(**x).logits
        assert torch.equal(reloaded(**x).logits, want)
        assert torch.equal(loaded(**x).logits, want)


def masked_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4)).eval()  # fmt: skip


def test_masks_kept_through_shrink_are_saved_and_loaded(tmp_path: Path) -> None:
    small = masked_mlp()
    pk.prune(small, 0.5, granularity="filter", layers=["0"])
    pk.prune(small, 0.75, granularity="element", layers=["0", "2"])
    pk.shrink(small, torch.randn(4, 8))
    pk.save_shrunk(small, tmp_path / "s")
    loaded = pk.load_shrunk(masked_mlp(), tmp_path / "s")
    for name in ("0", "2"):
        mask = get_mask(loaded.get_submodule(name))
        assert mask is not None and torch.equal(mask, get_mask(small.get_submodule(name)))
    with torch.no_grad():
        x = torch.randn(4, 8)
        assert torch.equal(loaded(x), small(x))
    layout = json.loads((tmp_path / "s" / "shrunk.json").read_text())
    assert set(layout["masks"]) == {"0.weight", "2.weight"}


def test_masks_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    small = masked_mlp()
    pk.prune(small, 0.5, granularity="filter", layers=["0"])
    pk.prune(small, 0.75, granularity="element", layers=["2"])
    pk.shrink(small, torch.randn(4, 8))
    pk.save_shrunk(small, tmp_path / "s")
    file, masks = tmp_path / "s" / "shrunk.json", tmp_path / "s" / "masks.safetensors"
    layout = json.loads(file.read_text())
    del layout["sha256"]  # as if saved before digests: every other check must hold
    cases = [
        ({**layout, "masks": {"2.weight": [3, 3]}}, None, CheckpointError, r"but the weight is"),
        ({**layout, "masks": {"9.weight": [1]}}, None, ShrunkLayoutError, "no such weight"),
        (layout, {"2.weight": torch.full((32, 16), 2, dtype=torch.uint8)}, CheckpointError,
         "not 0 / 1 bytes"),
        (layout, {}, CheckpointError, "missing, unlisted"),
    ]  # fmt: skip
    for edit, stored, error, match in cases:
        file.write_text(json.dumps(edit))
        if stored is not None:
            save_file(stored, str(masks))
        model = masked_mlp()
        before = snapshot(model)
        with pytest.raises(error, match=match):
            pk.load_shrunk(model, tmp_path / "s")
        assert_unchanged(model, before)


def test_a_width_the_config_cannot_say_is_not_written(tmp_path: Path) -> None:
    """BERT derives its head size as hidden_size / num_attention_heads: a narrower stream
    with all 4 heads kept cannot be written, so the config stays and a note says why."""
    T = pytest.importorskip("transformers")
    config = T.BertConfig(vocab_size=64, num_labels=3, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    small = T.BertForSequenceClassification(config).eval()
    fresh = copy.deepcopy(small)
    x = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}
    report = pk.shrink(small, x, {"bert.embeddings.word_embeddings": 0.5}, approximate=True)
    assert any("cannot describe removed heads at this width" in n for n in report.notes)
    assert (small.config.hidden_size, small.config.num_attention_heads) == (32, 4)
    assert small.bert.embeddings.word_embeddings.embedding_dim == 16
    assert not pk.save_shrunk(small, tmp_path / "s")  # from_pretrained could not rebuild it
    loaded = pk.load_shrunk(fresh, tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, small(**x).logits)
