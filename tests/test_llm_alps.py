"""ALPS (ADMM + PCG refit, Meng et al. 2024): exact sparsity, a lower reconstruction error
than SparseGPT, determinism, the route through pk.llm.prune, and bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import prunekit as pk
from prunekit.errors import UsageError
from prunekit.granularity import NM
from prunekit.layers import to_canonical
from prunekit.llm.alps import ALPS, alps
from prunekit.llm.methods import methods, parse_method
from prunekit.llm.sparsegpt import sparsegpt
from prunekit.masks import get_mask

OUT, IN, TOKENS = 48, 64, 256


def structured_layer(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(W, X, H)``: a random layer, low-rank-plus-noise inputs with uneven feature scales
    (as real activations), and ``H = (2/n) X^T X``."""
    gen = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(TOKENS, 8, generator=gen) @ torch.randn(8, IN, generator=gen)
    x = (low_rank + 0.2 * torch.randn(TOKENS, IN, generator=gen)) * torch.logspace(-0.5, 0.5, IN)
    weight = torch.randn(OUT, IN, generator=gen)
    return weight, x, 2 / TOKENS * x.T @ x


def output_error(weight: Tensor, new: Tensor, x: Tensor) -> float:
    """``||X W^T - X W'^T||_F``."""
    return float((x @ (weight - new).T).norm())


FAST = ALPS(iterations=60, cg_iterations=30)


@pytest.mark.parametrize("target", [0.7, 0.5, NM(2, 4), NM(4, 8)], ids=str)
def test_exact_sparsity_pattern(target: float | NM) -> None:
    weight, _, h = structured_layer()
    new, keep = alps(weight, h, target, FAST)
    assert new.dtype == torch.float32 and keep.dtype == torch.bool
    assert not bool(new[~keep].any())
    if isinstance(target, NM):
        assert (keep.reshape(-1, target.m).sum(1) == target.n).all()
    else:
        assert int(keep.sum()) == keep.numel() - round(target * keep.numel())


@pytest.mark.parametrize("target", [0.7, NM(2, 4)], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_reconstruction_error_at_most_sparsegpt(target: float | NM, seed: int) -> None:
    weight, x, h = structured_layer(seed)
    ours = output_error(weight, alps(weight, h, target)[0], x)
    theirs = output_error(weight, sparsegpt(weight, h, target)[0], x)
    assert ours <= theirs


def test_refit_is_the_least_squares_optimum_on_its_support() -> None:
    """With no damping, the refitted kept weights solve ``H_KK w_K = (H w0)_K`` per row."""
    weight, _, h = structured_layer()
    new, keep = alps(weight, h, 0.6, ALPS(iterations=30, cg_iterations=200, damping=0.0))
    h64, w64 = h.double(), weight.double()
    for row in range(0, OUT, 7):
        k = keep[row]
        exact = torch.linalg.solve(h64[k][:, k], (w64[row] @ h64)[k])
        assert torch.allclose(new[row, k].double(), exact, rtol=1e-3, atol=1e-3)


def test_deterministic() -> None:
    weight, _, h = structured_layer()
    first, second = alps(weight, h, 0.7, FAST), alps(weight, h, 0.7, FAST)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_dead_inputs_get_zero_weights() -> None:
    weight, x, _ = structured_layer()
    x[:, :5] = 0.0
    new, _ = alps(weight, 2 / TOKENS * x.T @ x, 0.5, FAST)
    assert not bool(new[:, :5].any())


def tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


IDS = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["alps", ALPS(iterations=30, cg_iterations=20)], ids=repr)
@pytest.mark.parametrize("sparsity", [0.7, "2:4"])
def test_through_llm_prune(method: str | ALPS, sparsity: float | str) -> None:
    model = tiny_llama()
    report = pk.llm.prune(model, IDS, method=method, sparsity=sparsity, progress=False,
                          keep_masks=True)  # fmt: skip
    assert report.method == repr(parse_method(method))
    linears = [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
    assert len(report.layers) == len(linears) == 14
    for module in linears:
        keep = to_canonical(module, get_mask(module)).bool()
        if sparsity == "2:4":
            assert (keep.reshape(-1, 4).sum(1) == 2).all()
        else:
            assert int(keep.sum()) == keep.numel() - round(0.7 * keep.numel())
    twin = tiny_llama()
    pk.llm.prune(twin, IDS, method=method, sparsity=sparsity, progress=False, keep_masks=True)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_registered_by_name() -> None:
    assert "alps" in methods()
    assert parse_method(" ALPS ") == ALPS() and repr(ALPS()) == "alps"
    assert repr(ALPS(iterations=5)) == "alps(iterations=5)"


@pytest.mark.parametrize(
    "bad",
    [
        {"rho": 0.0},
        {"rho": -1.0},
        {"rho": math.nan},
        {"rho": "0.1"},
        {"growth": 1.0},
        {"iterations": 0},
        {"iterations": 2.5},
        {"iterations": True},
        {"update_every": 0},
        {"cg_iterations": -1},
        {"damping": -0.01},
        {"damping": math.inf},
    ],
    ids=str,
)
def test_bad_settings_are_usage_errors(bad: dict) -> None:
    name = next(iter(bad))
    with pytest.raises(UsageError, match=f"ALPS.{name}=.*Fix: pass"):
        ALPS(**bad)
