"""Approximate mode: hidden-size pruning through LayerNorm-normalised residual streams,
opt-in, labelled inexact, with the deviation it measured."""

from __future__ import annotations

import copy

import pytest
import torch
from structured_models import assert_trains

import prunekit as pk
from prunekit.inputs import call
from prunekit.structured import build, plan, score
from prunekit.structured.state import approximate_norms
from prunekit.structured.surgery import group_masked
from prunekit.zoo import build_model, example_input


def masked_reference(model, x, ratio):
    with approximate_norms():
        graph = build(model, x)
    decisions = plan(graph, score(model, graph, "l2"), ratio)
    return group_masked(model, graph, {d.name: d.removed for d in decisions if d.removed})


@pytest.mark.parametrize("name", ["vit", "gpt"])
def test_hidden_size_is_pruned_and_the_deviation_reported(name: str) -> None:
    torch.manual_seed(0)
    model, x = build_model(name).eval(), example_input(name, 2)
    exact = pk.shrink(copy.deepcopy(model), x, 0.5)
    masked = masked_reference(model, x, 0.5)
    small = copy.deepcopy(model)
    report = pk.shrink(small, x, 0.5, approximate=True)
    assert not report.exact and exact.exact
    assert report.notes[-1].startswith("APPROXIMATE (not equivalent)")
    assert report.macs_after < exact.macs_after and report.params_after < exact.params_after
    with torch.no_grad():
        y, ref = call(small, x), call(masked, x)
    measured = ((y - ref).abs().max() / max(ref.abs().max(), call(model, x).abs().max())).item()
    assert report.deviation == pytest.approx(measured, rel=1e-4)
    assert report.deviation > 1e-4  # inexact, and said so
    norms = [m for m in small.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(n.normalized_shape == (n.weight.shape[0],) for n in norms)
    head = small.head if name == "vit" else small.lm_head
    assert {n.weight.shape[0] for n in norms} == {head.in_features} == {32}
    assert_trains(small, x)


def test_exact_mode_keeps_the_hidden_size() -> None:
    model, x = build_model("vit").eval(), example_input("vit", 2)
    report = pk.shrink(model, x, 0.5)
    assert report.exact and model.ln.normalized_shape == (64,)
    assert not any("APPROXIMATE" in n for n in report.notes)


def test_approximate_must_be_a_bool() -> None:
    model = build_model("vit").eval()
    with pytest.raises(pk.PruningError, match="approximate='yes'"):
        pk.shrink(model, example_input("vit"), 0.5, approximate="yes")
