"""Run a checked ``kind: llm`` recipe: :func:`prunekit.llm.prune` (Wanda, SparseGPT,
magnitude; uniform or OWL) on a causal LM, with held-out perplexity before and after.

With a ``distill:`` section the pruned model (masks kept) is then distilled from the dense
one (:mod:`prunekit.recipes.distill`) and its perplexity reported too.
``model: char-llama`` is the character-level Llama of :mod:`prunekit.zoo.lm` (cached by
``prunekit llm build-lm``); with ``--quick`` a tiny one (2 layers, 64 wide, 30 steps) is
trained on the spot instead, so CI needs no cache. Any ``save_pretrained``
directory with a tokenizer works too (see :mod:`prunekit.llm_models`). Before pruning,
:func:`check` validates the settings against the loaded model without running anything
on it (no copy: the model is the largest thing in memory).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from torch import Tensor, nn

import prunekit as pk
from prunekit import llm_models as models
from prunekit import model_spec
from prunekit.analysis.report import Section
from prunekit.errors import IncompatibleLayerError, PruningError
from prunekit.granularity import NM
from prunekit.layers import check_weight
from prunekit.llm.blocks import block_layers, find_blocks
from prunekit.llm.calibration import calibration_batches
from prunekit.llm.evaluate import perplexity
from prunekit.llm.methods import parse_method, parse_target
from prunekit.recipes import distill
from prunekit.recipes.validate import Recipe
from prunekit.zoo import lm

QUICK_SAMPLES, QUICK_SEQ, QUICK_EVAL_TOKENS = 8, 64, 8192


def load(recipe: Recipe, quick: bool) -> models.LoadedModel:
    """The recipe's model; ``char-llama`` under ``--quick`` is a tiny one trained now."""
    spec = recipe["model"]["spec"]
    try:
        if quick and spec == "char-llama":
            with tempfile.TemporaryDirectory() as tmp:
                path = lm.build_lm(
                    Path(tmp),
                    steps=30,
                    batch_size=4,
                    seq_len=QUICK_SEQ,
                    hidden=64,
                    layers=2,
                    seed=recipe["seed"],
                )
                loaded = models.load(str(path))
        else:
            loaded = models.load(spec)
    except PruningError as err:
        raise recipe.fail(("model",), spec, f"does not load: {err}", "fix the model.") from err
    if not loaded.causal:
        raise recipe.fail(
            ("model",),
            spec,
            "is not a causal LM (perplexity needs one)",
            "use char-llama or a ...ForCausalLM directory.",
        )
    return loaded


def _check_blocks(model: nn.Module, sparsity: float | str) -> None:
    """The blocks :func:`prunekit.llm.prune` would prune exist, and each of their layers can
    take ``sparsity`` (an N:M pattern needs M to divide its inputs); weights are read only
    through a sum per layer."""
    target = parse_target(sparsity)
    prefix, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        for layer in block_layers(block, f"{prefix}.{index}"):
            check_weight(layer)
            if isinstance(target, NM) and (reason := target.incompatibility(layer)):
                raise IncompatibleLayerError(f"layer {layer.name!r}: {reason}")


def check(recipe: Recipe, model: nn.Module, calibration: Tensor) -> None:
    """Validate the recipe's ``llm`` settings against ``model`` and the ``calibration``
    ids without pruning: the method, the sparsity, the blocks and their layers, the token
    ids. Nothing runs on the model and nothing of its size is allocated, so this costs a
    few scalars, not a copy; an error names the ``llm`` line."""
    s = recipe["llm"]
    try:
        parse_method(s["method"])
        _check_blocks(model, s["sparsity"])
        calibration_batches(calibration, model)
    except PruningError as err:
        raise recipe.fail(("llm",), s["method"], f"fails on the model: {err}", "fix llm:.") from err


def run(recipe: Recipe, quick: bool, console: Console, folder: Path) -> list[Section]:
    """Prune, evaluate, optionally save; return the report's sections."""
    s = recipe["llm"]
    loaded = load(recipe, quick)
    loaded.model.to(model_spec.device(recipe["device"]))  # checked when the recipe was read
    samples = min(s["samples"], QUICK_SAMPLES) if quick else s["samples"]
    max_len = getattr(loaded.model.config, "max_position_embeddings", s["seq_len"])
    seq_len = min(s["seq_len"], QUICK_SEQ if quick else s["seq_len"], max_len)
    calibration = lm.calibration_ids(loaded.encode, samples, seq_len, recipe["seed"])
    held_out = lm.held_out_ids(loaded.encode)
    held_out = held_out[:QUICK_EVAL_TOKENS] if quick else held_out
    check(recipe, loaded.model, calibration)
    dense = perplexity(loaded.model, held_out, seq_len=seq_len)
    kd = distill.settings(recipe)
    teacher = copy.deepcopy(loaded.model) if kd is not None else None  # the dense teacher
    options = dict(method=s["method"], sparsity=s["sparsity"], allocation=s["allocation"])
    report = pk.llm.prune(loaded.model, calibration, keep_masks=kd is not None, **options)
    console.print(report)
    pruned = perplexity(loaded.model, held_out, seq_len=seq_len)
    rows = [
        {"model": "dense", "perplexity": dense},
        {"model": report.summary(), "perplexity": pruned},
    ]
    protocol = ""
    if kd is not None and teacher is not None:
        args = (loaded.model, teacher, loaded.encode, seq_len, quick, console.print)
        protocol = " " + distill.recover(recipe, kd, *args) + "."
        after = perplexity(loaded.model, held_out, seq_len=seq_len)
        rows.append({"model": f"{report.summary()} + distilled", "perplexity": after})
    sections = [
        Section(
            "Perplexity",
            f"{models.calibration_protocol(samples, seq_len, recipe['seed'])}; perplexity on "
            f"{len(held_out):,} held-out tokens in windows of {seq_len}.{protocol}",
            rows,
        ),
        Section(
            "Layers",
            "Per-layer sparsity and relative output error.",
            [asdict(layer) for layer in report.layers],
        ),
    ]
    if recipe["export"]["formats"]:
        pk.bake(loaded.model)
        loaded.save(folder / "model")
        sections.append(Section("Export", f"save_pretrained directory {folder / 'model'}."))
    return sections
