"""Every argument of every public Python entry point, fuzzed with :data:`JUNK` (wrong types,
NaN, inf, huge and negative numbers, strings, bytes, containers, tensors, callables that
raise): each value runs or is refused cleanly (:func:`test_bad_inputs.refuses_cleanly`),
and a value no correct call takes is refused."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import example, given
from test_bad_inputs import (
    BATCHES,
    CANON,
    DATA,
    EXAMPLES,
    IMAGES,
    JUNK,
    NOWHERE,
    TOKENS,
    Hung,
    always,
    bounded,
    cnn,
    is_int,
    is_real,
    mlp,
    never,
    not_count,
    not_fraction,
    not_module,
    not_real,
    not_seed,
    not_spec,
    pruned,
    refuses_cleanly,
    short,
    shrunk_dir,
    sparse_file,
    tame,
    tiny_lm,
)
from torch import nn

import prunekit as pk

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = torch.tensor([0, 1])  # classes of IMAGES for cnn's logits


# -- the Python entry points -------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One argument of one entry point: ``call(model, value)`` on a fresh ``make()``;
    ``bad(value)``: values that must be refused; ``keys``: names a message may use
    instead of the value; ``keep(value)``: the values of :data:`JUNK` and :data:`CANON`
    tried."""

    make: Callable[[], nn.Module]
    call: Callable[[nn.Module, Any], object]
    bad: Callable[[Any], bool] = never
    keys: tuple[str, ...] = ()
    keep: Callable[[Any], bool] = always


def argument(name: str) -> tuple[str, ...]:
    """How a message may name the argument of case ``name`` ("prune.min_keep (x)"):
    ``min_keep`` or ``min keep``."""
    arg = name.split(" ")[0].rsplit(".", 1)[-1]
    return arg, arg.replace("_", " ")


def check_case(case: Case, value: Any, keys: tuple[str, ...] = ()) -> None:
    model = case.make()
    keys = (*case.keys, *keys)
    err = refuses_cleanly(lambda: case.call(model, value), model, value, keys)
    assert err is not None or not case.bad(value), f"{value!r} was accepted"


def fuzz(name: str, case: Case, examples: int = EXAMPLES) -> None:
    """Run :func:`check_case` on :data:`CANON` and on values drawn from :data:`JUNK`
    (hypothesis, :func:`bounded`); a message may name the argument of ``name`` instead
    of the value."""

    @bounded(examples)
    @given(value=JUNK.filter(case.keep))
    def run(value: Any) -> None:
        try:
            check_case(case, value, argument(name))
        except Hung as hung:  # not shrunk (each try would take LIMIT_S): say which value
            raise Hung(f"{name}={value!r}: {hung}") from None

    for value in filter(case.keep, CANON):
        run = example(value=value)(run)
    run()


def prune_arg(arg: str, bad: Callable[[Any], bool] = never, **fixed: Any) -> Case:
    call = lambda m, v: pk.prune(m, **{"sparsity": 0.5, **fixed, arg: v})  # noqa: E731
    return Case(mlp, call, bad)


def shrink_arg(arg: str, bad: Callable[[Any], bool] = never, **fixed: Any) -> Case:
    kwargs = {"example_inputs": IMAGES, "ratio": 0.5, **fixed}
    call = lambda m, v: pk.shrink(m, **{**kwargs, arg: v})  # noqa: E731
    return Case(cnn, call, bad)


def convert_arg(arg: str, bad: Callable[[Any], bool] = never, **fixed: Any) -> Case:
    granularity = {"nm": "2:4", "bsr": "block:2x2"}.get(fixed.get("format", ""), "element")
    call = lambda m, v: pk.sparse.convert(m, **{**fixed, arg: v})  # noqa: E731
    return Case(lambda: pruned(granularity), call, bad)


def llm_arg(arg: str, bad: Callable[[Any], bool] = never) -> Case:
    def call(model: nn.Module, value: Any) -> object:
        kwargs = {"calibration": TOKENS, "progress": False, arg: value}
        return pk.llm.prune(model, **kwargs)

    return Case(tiny_lm, call, bad)


def iterative_arg(
    arg: str, bad: Callable[[Any], bool] = never, keep: Callable[[Any], bool] = always
) -> Case:
    def call(model: nn.Module, value: Any) -> object:
        kwargs = {"data": DATA, "target": 0.5, "rounds": 1, "epochs": 1, "batch_size": 16}
        return pk.training.iterative_pruning(model, **{**kwargs, "progress": False, arg: value})

    return Case(mlp, call, bad, keep=keep)


LOTTERY = {"data": DATA, "rounds": 1, "epochs": 1, "batch_size": 16, "control": False}


def lottery_arg(
    arg: str, bad: Callable[[Any], bool] = never, keep: Callable[[Any], bool] = always
) -> Case:
    def call(model: nn.Module, value: Any) -> object:
        return pk.training.lottery(model, **{**LOTTERY, arg: value})

    return Case(mlp, call, bad, keep=keep)


def profile_arg(arg: str, bad: Callable[[Any], bool] = never) -> Case:
    def call(model: nn.Module, value: Any) -> object:
        kwargs = {"example_inputs": IMAGES, "latency": False, arg: value}
        return pk.analysis.profile(model, **kwargs)

    return Case(cnn, call, bad)


def not_rate(value: Any) -> bool:
    return not is_real(value, 0.0, 1.0) or value == 0


def not_blocksize(value: Any) -> bool:
    """Not None, a block side or a pair of them."""
    sides = value if isinstance(value, tuple | list) and len(value) == 2 else (value,)
    return value is not None and not all(type(b) is int and b >= 1 for b in sides)


CASES: dict[str, Case] = {
    # pk.prune
    "prune.model": Case(mlp, lambda m, v: pk.prune(v, 0.5), not_module),
    "prune.sparsity": Case(mlp, lambda m, v: pk.prune(m, v), not_fraction),
    "prune.granularity": prune_arg("granularity"),
    "prune.criterion": prune_arg("criterion"),
    "prune.scope": prune_arg("scope"),
    "prune.allocation": prune_arg("allocation"),
    "prune.layers": prune_arg("layers"),
    "prune.exclude": prune_arg("exclude"),
    "prune.min_keep": prune_arg("min_keep", lambda v: not (type(v) is int and v >= 0)),
    "prune.seed": prune_arg("seed", not_seed),
    "prune.data (taylor)": prune_arg("data", lambda v: v is not None, criterion="taylor"),
    "prune.loss_fn (taylor)": prune_arg(
        "loss_fn", lambda v: v is not None, criterion="taylor", data=BATCHES
    ),
    "prune.spec": Case(mlp, lambda m, v: pk.prune(m, 0.5, spec=v), not_spec),
    "prune.<unknown keyword>": Case(
        mlp, lambda m, v: pk.prune(m, 0.5, colour=v), always, keys=("colour",)
    ),
    # pk.Pruner
    "Pruner.model": Case(mlp, lambda m, v: pk.Pruner(v, 0.5), not_module),
    "Pruner.target": Case(mlp, lambda m, v: pk.Pruner(m, v), not_fraction),
    "Pruner.schedule": Case(
        mlp, lambda m, v: pk.Pruner(m, 0.5, schedule=v), lambda v: v is not None
    ),
    "Pruner.granularity": Case(mlp, lambda m, v: pk.Pruner(m, 0.5, granularity=v)),
    "Pruner.layers": Case(mlp, lambda m, v: pk.Pruner(m, 0.5, layers=v)),
    "Pruner.load_state_dict": Case(mlp, lambda m, v: pk.Pruner(m, 0.5).load_state_dict(v), always),
    # pk.shrink
    "shrink.model": Case(cnn, lambda m, v: pk.shrink(v, IMAGES, 0.5), not_module),
    "shrink.example_inputs": Case(cnn, lambda m, v: pk.shrink(m, v, 0.5), always),
    "shrink.ratio": shrink_arg("ratio"),
    "shrink.criterion": shrink_arg("criterion"),
    "shrink.scope": shrink_arg("scope"),
    "shrink.normalize": shrink_arg("normalize"),
    "shrink.round_to": shrink_arg("round_to", lambda v: not (type(v) is int and v >= 1)),
    "shrink.ignore": shrink_arg("ignore"),
    "shrink.seed": shrink_arg("seed", not_seed),
    "shrink.data (taylor)": shrink_arg("data", lambda v: v is not None, criterion="taylor"),
    "shrink.loss_fn (taylor)": shrink_arg(
        "loss_fn", lambda v: v is not None, criterion="taylor", data=[(IMAGES, LABELS)]
    ),
    # masks
    "bake.model": Case(pruned, lambda m, v: pk.bake(v), not_module),
    "masks.remove.model": Case(pruned, lambda m, v: pk.masks.remove(v), not_module),
    "sparsity.model": Case(pruned, lambda m, v: pk.sparsity(v), not_module),
    "sparsity.layers": Case(pruned, lambda m, v: pk.sparsity(m, layers=v)),
    "sparsity.exclude": Case(pruned, lambda m, v: pk.sparsity(m, exclude=v)),
    # pk.sparse
    "sparse.convert.model": Case(pruned, lambda m, v: pk.sparse.convert(v), not_module),
    "sparse.convert.format": convert_arg("format"),
    "sparse.convert.layers": convert_arg("layers", format="csr"),
    "sparse.convert.exclude": convert_arg("exclude", format="csr"),
    "sparse.convert.nm": convert_arg("nm", format="nm"),
    "sparse.convert.bsr_kernel": convert_arg("bsr_kernel", format="bsr", blocksize=2),
    "sparse.convert.margin": convert_arg("margin", format="auto"),
    "sparse.convert.blocksize": convert_arg("blocksize", not_blocksize, format="bsr"),
    "sparse.convert.batch_size": convert_arg("batch_size", not_count, format="csr"),
    "sparse.save.model": Case(pruned, lambda m, v: pk.sparse.save(v, NOWHERE), not_module),
    "sparse.load.model": Case(mlp, lambda m, v: pk.sparse.load(v, sparse_file()), not_module),
    # structured save / load
    "save_shrunk.model": Case(cnn, lambda m, v: pk.save_shrunk(v, NOWHERE), not_module),
    "load_shrunk.model": Case(cnn, lambda m, v: pk.load_shrunk(v, shrunk_dir()), not_module),
    # pk.llm
    "llm.prune.model": Case(
        tiny_lm, lambda m, v: pk.llm.prune(v, torch.ones(1, 4).long()), not_module
    ),
    "llm.prune.calibration": llm_arg("calibration", always),
    "llm.prune.method": llm_arg("method"),
    "llm.prune.sparsity": llm_arg("sparsity"),
    "llm.prune.allocation": llm_arg("allocation"),
    # pk.training
    "iterative_pruning.model": Case(
        mlp, lambda m, v: pk.training.iterative_pruning(v, DATA, target=0.5), not_module
    ),
    "iterative_pruning.data": iterative_arg("data", always),
    "iterative_pruning.target": iterative_arg(
        "target", lambda v: v is not None and not_fraction(v)
    ),
    "iterative_pruning.criterion": iterative_arg("criterion"),
    "iterative_pruning.scope": iterative_arg("scope"),
    "iterative_pruning.layers": iterative_arg("layers"),
    "iterative_pruning.evaluate": iterative_arg(
        "evaluate", lambda v: not callable(v) and v is not None
    ),
    "iterative_pruning.rounds": iterative_arg("rounds", not_count, short),
    "iterative_pruning.epochs": iterative_arg("epochs", lambda v: not is_int(v, 0), short),
    "iterative_pruning.finetune_lr": iterative_arg("finetune_lr", not_real, tame),
    "iterative_pruning.batch_size": iterative_arg("batch_size", not_count),
    "iterative_pruning.seed": iterative_arg("seed", not_seed),
    "iterative_pruning.optimizer": iterative_arg("optimizer", lambda v: v not in ("adam", "sgd")),
    "iterative_pruning.weight_decay": iterative_arg("weight_decay", not_real, tame),
    "lottery.control": lottery_arg("control", lambda v: not isinstance(v, bool)),
    "lottery.model": Case(mlp, lambda m, v: pk.training.lottery(v, **LOTTERY), not_module),
    "lottery.rounds": lottery_arg("rounds", not_count, short),
    "lottery.epochs": lottery_arg("epochs", not_count, short),
    "lottery.rate": lottery_arg("rate", not_rate),
    "lottery.output_rate": lottery_arg("output_rate", lambda v: v is not None and not_rate(v)),
    "lottery.val_fraction": lottery_arg("val_fraction", not_rate),
    "lottery.batch_size": lottery_arg("batch_size", not_count),
    "lottery.seed": lottery_arg("seed", not_seed),
    "lottery.data": lottery_arg("data", always),
    "lottery.rewind": lottery_arg("rewind"),
    "lottery.lr": lottery_arg("lr", not_real, tame),
    "lottery.optimizer": lottery_arg("optimizer"),
    "lottery.step": lottery_arg("step", lambda v: v is not None),
    # pk.analysis
    "profile.model": Case(
        cnn, lambda m, v: pk.analysis.profile(v, IMAGES, latency=False), not_module
    ),
    "profile.layers": profile_arg("layers"),
    "profile.example_inputs": Case(
        cnn, lambda m, v: pk.analysis.profile(m, v, latency=False), always
    ),
    "profile.min_run_time": profile_arg(
        "min_run_time", lambda v: not is_real(v, 0.0, 3600.0, closed=True) or v == 0
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_every_argument_runs_or_is_refused_cleanly(name: str) -> None:
    fuzz(name, CASES[name])
