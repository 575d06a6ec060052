"""A user's criterion or score function that raises is named, in every engine; seeds
that torch cannot hold are refused before anything runs."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import assert_unchanged, snapshot
from torch import nn

import prunekit as pk
from prunekit.errors import UserCallbackError


class Broken(pk.criteria.Criterion):
    name = "broken"

    def scores(self, units, ctx):
        raise ZeroDivisionError("my bug")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("engine", ["prune", "shrink", "llm"])
def test_a_raising_criterion_is_named_in_every_engine(engine: str) -> None:
    if engine == "llm":
        config = transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1,
        )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    else:
        model = _mlp()
    before = snapshot(model)
    with pytest.raises(UserCallbackError, match="criterion broken") as info:
        if engine == "prune":
            pk.prune(model, 0.5, criterion=Broken())
        elif engine == "shrink":
            pk.shrink(model, torch.randn(2, 8), 0.5, criterion=Broken())
        else:
            pk.llm.prune(model, torch.randint(0, 32, (2, 8)), method=Broken(), progress=False)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert_unchanged(model, before)


def test_a_seed_torch_cannot_hold_is_refused() -> None:
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(pk.PruningError, match="seed"):
        pk.prune(model, 0.5, criterion="random", seed=10**30)
    assert_unchanged(model, before)


def test_a_raising_validate_is_named() -> None:
    data = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]

    def validate(model: nn.Module) -> float:
        raise KeyError("oops")

    with pytest.raises(UserCallbackError, match="validate"):
        pk.training.lottery(
            _mlp(), data, rounds=1, epochs=1, evaluate=lambda m: 0.0, validate=validate,
            control=False, progress=False,
        )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": "2"},
        {"epochs": -1},
        {"lr": float("nan")},
        {"lr": -0.1},
        {"weight_decay": float("inf")},
        {"momentum": "0.9"},
    ],
)
def test_fit_refuses_bad_numbers_before_training(kwargs: dict) -> None:
    model = _mlp()
    before = snapshot(model)
    data = [(torch.randn(4, 8), torch.randint(0, 4, (4,)))]
    with pytest.raises(pk.PruningError, match=next(iter(kwargs))):
        pk.training.fit(model, data, **kwargs)
    assert_unchanged(model, before)
    with pytest.raises(pk.PruningError, match=r"nn\.Module"):
        pk.training.fit(None, data)


def test_method_settings_refuse_nan() -> None:
    from prunekit.training.configs import between

    with pytest.raises(pk.PruningError, match="NaN"):
        between(0.0, 1.0).check(float("nan"))


def my_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    raise ZeroDivisionError("my loss bug")


@pytest.mark.parametrize("engine", ["prune", "shrink"])
def test_a_raising_loss_fn_is_named(engine: str) -> None:
    model = _mlp()
    data = [(torch.randn(4, 8), torch.randint(0, 4, (4,)))]
    before = snapshot(model)
    with pytest.raises(UserCallbackError, match="loss_fn 'my_loss' raised ZeroDivisionError"):
        if engine == "prune":
            pk.prune(model, 0.5, criterion="taylor", data=data, loss_fn=my_loss)
        else:
            pk.shrink(model, data[0][0], 0.5, criterion="taylor", data=data, loss_fn=my_loss)
    assert_unchanged(model, before)


@pytest.mark.parametrize("data", ["abc", b"\x00", [None], [(None, None)], [("ab", "cd")]])
@pytest.mark.parametrize("engine", ["prune", "shrink"])
def test_calibration_batches_no_model_takes_are_refused(engine: str, data: object) -> None:
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(pk.PruningError, match="data"):
        if engine == "prune":
            pk.prune(model, 0.5, criterion="taylor", data=data)
        else:
            pk.shrink(model, torch.randn(2, 8), 0.5, criterion="taylor", data=data)
    assert_unchanged(model, before)


def test_a_raising_model_factory_is_named() -> None:
    def factory() -> nn.Module:
        raise OSError("no weights here")

    data = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    with pytest.raises(UserCallbackError, match=r"model factory .*factory raised OSError") as info:
        pk.training.lottery(factory, data, rounds=1, epochs=1, evaluate=lambda m: 0.0,
                            validate=lambda m: 0.0, control=False)  # fmt: skip
    assert isinstance(info.value.__cause__, OSError)
