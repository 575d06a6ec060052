"""Unusual weights through every entry point that reads them: NaN, inf, meta, float16,
bfloat16, zero-size, tied, shared, frozen, parametrized (weight_norm old and new,
spectral_norm, orthogonal), torch.nn.utils.prune masks and prunekit's own masks, each
crossed with every operation (a matrix, not a sample: every pair runs).

Each pair is refused cleanly (:func:`test_bad_inputs.refuses_cleanly`; the message names
the layer or the property) or it runs, and then nothing went silently wrong: the model
still runs; read-only calls (sparsity, profile, saves) changed nothing; ``bake`` and
``convert`` kept the outputs and ``remove`` restored the dense ones; tied weights are
still one tensor, a user's parametrization is still there, frozen weights are still
frozen and no dtype changed. Weights holding NaN or inf are never ranked: every prune
of them is refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from conftest import assert_unchanged, snapshot
from test_bad_inputs import TOKENS, refuses_cleanly, structure, tiny_lm
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import prunekit as pk

pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 3])


def base() -> nn.Module:
    """Three same-shape hidden layers, so that two of them can be tied or shared."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16),
        nn.ReLU(), nn.Linear(16, 4),
    )  # fmt: skip


def _pair(model: nn.Module) -> tuple[str, str]:
    """The first two Linear layers of equal weight shape (names)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for i, (a, ma) in enumerate(linears):
        for b, mb in linears[i + 1 :]:
            if ma.weight.shape == mb.weight.shape:
                return a, b
    raise AssertionError("no two Linear layers of one shape")


def _first(model: nn.Module) -> nn.Module:
    return model.get_submodule(_pair(model)[0])


def _poke(value: float) -> Callable[[nn.Module], None]:
    def poke(model: nn.Module) -> None:
        with torch.no_grad():
            _first(model).weight[0, 0] = value

    return poke


def _tie(model: nn.Module) -> None:
    a, b = _pair(model)
    model.get_submodule(b).weight = model.get_submodule(a).weight


def _share(model: nn.Module) -> None:
    a, b = _pair(model)
    parent, _, leaf = b.rpartition(".")
    setattr(model.get_submodule(parent), leaf, model.get_submodule(a))


def _freeze(model: nn.Module) -> None:
    model.requires_grad_(False)


def _old_weight_norm(model: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(_first(model))


def _register(fn: Callable[[nn.Module], object]) -> Callable[[nn.Module], None]:
    return lambda model: fn(_first(model)) and None


def _zero_size(model: nn.Module) -> None:
    with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op"
        warnings.simplefilter("ignore", UserWarning)
        model[2], model[4] = nn.Linear(16, 0), nn.Linear(0, 16)  # no hidden units between


VARIANTS: dict[str, tuple[Callable[[nn.Module], Any], tuple[str, ...]]] = {
    # name: (apply to a model in place, words a refusal may name besides the layer)
    "nan": (_poke(float("nan")), ("NaN", "nan")),
    "inf": (_poke(float("inf")), ("inf",)),
    "meta": (lambda m: m.to("meta"), ("meta",)),
    "float16": (lambda m: m.half(), ("float16", "half")),
    "bfloat16": (lambda m: m.bfloat16(), ("bfloat16",)),
    "zero-size": (_zero_size, ("empty",)),
    "tied": (_tie, ("share", "tied")),
    "shared module": (_share, ("share", "tied")),
    "frozen": (_freeze, ("frozen", "requires_grad")),
    "weight_norm (old)": (_old_weight_norm, ("weight_norm", "weight_g")),
    "weight_norm": (_register(parametrizations.weight_norm), ("_WeightNorm",)),
    "spectral_norm": (_register(parametrizations.spectral_norm), ("_SpectralNorm",)),
    "orthogonal": (_register(parametrizations.orthogonal), ("_Orthogonal",)),
    "torch prune mask": (
        _register(lambda m: torch_prune.l1_unstructured(m, "weight", 0.3)),
        ("torch.nn.utils.prune",),
    ),
    "prunekit masks": (lambda m: pk.prune(m, 0.3), ("mask",)),
}
NON_FINITE = {"nan", "inf"}


def variant(name: str, make: Callable[[], nn.Module] = base) -> nn.Module:
    model = make()
    VARIANTS[name][0](model)
    return model.eval()


@dataclass(frozen=True)
class Op:
    """``call(model, x, tmp)`` (``x``: an input in the model's dtype) after
    ``setup(model)`` (which may refuse: then the pair is the setup's own row).

    ``keeps``: "state" (read-only), "outputs" (same function), "dense" (the outputs
    before the setup) or "" (prunes: invariants only); ``converts``: layers are replaced
    (their invariants are the outputs'); ``make`` and ``x``: the model the variants are
    made of and its input."""

    call: Callable[[nn.Module, torch.Tensor, Path], object]
    setup: Callable[[nn.Module], object] | None = None
    keeps: str = ""
    prunes: bool = False
    converts: bool = False
    make: Callable[[], nn.Module] = base
    x: torch.Tensor = X


def _prune(**kwargs: Any) -> Op:
    def call(model: nn.Module, x: torch.Tensor, tmp: Path) -> object:
        data = [(x, Y)] if kwargs.get("criterion") == "taylor" else None
        return pk.prune(model, **{"sparsity": 0.5, "data": data, **kwargs})

    return Op(call, prunes=True)


def _step(model: nn.Module) -> None:
    pk.Pruner(model, 0.5).step()


def _masked(sparsity: float | None = 0.5, **kwargs: Any) -> Callable[[nn.Module], object]:
    return lambda m: pk.prune(m, sparsity, **kwargs)


def _csr(model: nn.Module) -> None:
    pk.prune(model, 0.9)
    pk.sparse.convert(model, "csr")


LLM_METHODS = {"wanda": {}, "sparsegpt": {"method": "sparsegpt"}, "2:4": {"sparsity": "2:4"}}


def _llm(**kwargs: Any) -> Op:
    def call(model: nn.Module, x: torch.Tensor, tmp: Path) -> object:
        return pk.llm.prune(model, x, progress=False, **kwargs)

    return Op(call, prunes=True, make=tiny_lm, x=TOKENS)


OPS: dict[str, Op] = {
    "prune": _prune(),
    "prune global": _prune(scope="global"),
    "prune rows l2": _prune(granularity="row", criterion="l2"),
    "prune 2:4": _prune(sparsity=None, granularity="2:4"),
    "prune taylor": _prune(criterion="taylor"),
    "Pruner.step": Op(lambda m, x, tmp: _step(m), prunes=True),
    "shrink": Op(lambda m, x, tmp: pk.shrink(m, x, ratio=0.5), prunes=True),
    "bake": Op(lambda m, x, tmp: pk.bake(m), _masked(), "outputs"),
    "masks.remove": Op(lambda m, x, tmp: pk.masks.remove(m), _masked(), "dense"),
    "sparsity": Op(lambda m, x, tmp: pk.sparsity(m), keeps="state"),
    "profile": Op(lambda m, x, tmp: pk.analysis.profile(m, x, latency=False), keeps="state"),
    "convert csr": Op(
        lambda m, x, tmp: pk.sparse.convert(m, "csr"), _masked(0.9), "outputs", converts=True
    ),
    "convert nm": Op(
        lambda m, x, tmp: pk.sparse.convert(m, "nm"),
        _masked(None, granularity="2:4"),
        "outputs",
        converts=True,
    ),
    "sparse.save": Op(lambda m, x, tmp: pk.sparse.save(m, tmp / "m.safetensors"), _csr, "state"),
    "save_shrunk": Op(lambda m, x, tmp: pk.save_shrunk(m, tmp / "shrunk"), keeps="state"),
    **{f"llm.prune {method}": _llm(**kwargs) for method, kwargs in LLM_METHODS.items()},
}


def example(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    """``x`` in the dtype of ``model``'s floating weights (token ids stay as they are)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None or not x.is_floating_point():
        return x
    return x.to(param.dtype)


def outputs(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor | None:
    """``model(x)`` (None on the meta device)."""
    if any(p.is_meta for p in model.parameters()):
        return None
    with torch.no_grad():
        return model(example(model, x))


def assert_close(after: torch.Tensor | None, before: torch.Tensor | None) -> None:
    if after is None or before is None:
        return
    rtol, atol = (1e-5, 1e-6) if before.dtype == torch.float32 else (2e-2, 2e-2)
    torch.testing.assert_close(after, before, rtol=rtol, atol=atol, equal_nan=True)


def _user_chain(model: nn.Module) -> dict[str, list[str]]:
    """The parametrizations of every tensor, prunekit's masks left out."""
    chains = structure(model)["parametrizations"]
    chains = {k: [t for t in v if t != "WeightMask"] for k, v in chains.items()}
    return {k: v for k, v in chains.items() if v}


def _stored(module: nn.Module) -> object:
    """What holds ``module``'s weight: the parameter, or its parametrization chain."""
    if parametrize.is_parametrized(module, "weight"):
        chain = module.parametrizations.weight
        return getattr(chain, "original", chain)
    return module.weight


def _ties(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs of layers whose stored weight is one tensor."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [(a, b) for i, (a, ma) in enumerate(layers) for b, mb in layers[i + 1 :]
            if _stored(ma) is _stored(mb)]  # fmt: skip


def invariants(model: nn.Module) -> dict[str, Any]:
    """What any call that ran must keep: user parametrizations, ties, frozen weights,
    dtypes (read before and after; converted models are compared by outputs only)."""
    params = {n: p for n, p in model.named_parameters() if not n.endswith(".packed")}
    return {
        "user parametrizations": _user_chain(model),
        "ties": _ties(model),
        "frozen": sorted(
            n.replace(".parametrizations.weight.original", ".weight")
            for n, p in params.items()
            if not p.requires_grad
        ),
        "dtypes": sorted({p.dtype for p in params.values()}, key=str),
    }


class _NoValue:
    """No argument value to name: a refusal names the layer or the property."""


def check(
    model: nn.Module, op: Op, x: torch.Tensor, tmp: Path, keys: tuple[str, ...], finite: bool
) -> None:
    """Run ``op`` on ``model`` (its setup already done) and assert the module docstring."""
    before, held = snapshot(model), invariants(model)
    expected = outputs(model, x)
    layer_names = tuple(f"'{n}'" for n, _ in model.named_modules() if n)
    call = lambda: op.call(model, example(model, x), tmp)  # noqa: E731
    if refuses_cleanly(call, model, _NoValue(), (*keys, *layer_names)) is not None:
        return
    assert finite or not op.prunes, "weights holding NaN or inf were ranked and pruned"
    after = outputs(model, x)
    if op.keeps == "state":
        assert_unchanged(model, before)
    elif op.keeps == "outputs":
        assert_close(after, expected)
    if not op.converts:
        assert invariants(model) == held


def run(name: str, op: str, tmp: Path) -> None:
    """Variant ``name`` through operation ``op`` (the module docstring)."""
    the_op = OPS[op]
    model = variant(name, the_op.make)
    dense = None
    if the_op.keeps == "dense":  # remove restores the weights before any prunekit mask
        dense = outputs(the_op.make() if name == "prunekit masks" else model, the_op.x)
    if the_op.setup is not None:
        try:
            the_op.setup(model)
        except pk.PruningError:
            return  # the setup's refusal is the row of the operation it is (prune)
    check(model, the_op, the_op.x, tmp, VARIANTS[name][1], name not in NON_FINITE)
    if dense is not None:
        assert_close(outputs(model, the_op.x), dense)


MATRIX = [
    (name, op)
    for name in VARIANTS
    for op in OPS
    if not (name == "zero-size" and OPS[op].make is tiny_lm)
]


@pytest.mark.parametrize(("name", "op"), MATRIX)
def test_unusual_weights_through_every_operation(name: str, op: str, tmp_path: Path) -> None:
    run(name, op, tmp_path)
