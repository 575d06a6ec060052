"""One error family, continued: half precision in sparse.convert, calibration length,
exceptions inside a user's callback, and raw Python errors where input reached torch."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import prunekit as pk
from prunekit import model_spec
from prunekit.errors import (
    CalibrationError,
    IncompatibleLayerError,
    ModelSpecError,
    PruningError,
    UserCallbackError,
)
from prunekit.training import fit, iterative_pruning

pytestmark = pytest.mark.usefixtures("one_thread")
# -- 3. sparse.convert on half precision ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm", "auto"])
def test_convert_half_precision_runs_or_refuses(dtype: torch.dtype, fmt: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).to(dtype)
    granularity = {"nm": "2:4", "bsr": "block:4x4"}.get(fmt, "element")
    pk.prune(model, 0.5 if fmt == "nm" else 0.9, granularity=granularity)
    x = torch.randn(3, 64, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    before = snapshot(model)
    try:
        pk.sparse.convert(model, fmt, blocksize=4 if fmt == "bsr" else None, batch_size=3)
    except IncompatibleLayerError as err:
        assert str(dtype) in str(err) and "Fix: convert a float32 copy" in str(err)
        assert_unchanged(model, before)
        return
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=2e-2, atol=2e-2)


# -- 4. calibration longer than the model's positions ---------------------------------------


def test_calibration_longer_than_the_positions_fails_first() -> None:
    from prunekit.zoo.hf import tiny_transformer

    model, _ = tiny_transformer("gpt2")
    limit = model.config.max_position_embeddings
    before = snapshot(model)
    ids = torch.randint(0, 100, (2, limit + 1))
    with pytest.raises(CalibrationError, match=rf"{limit + 1} tokens, longer than the {limit} "):
        pk.llm.prune(model, ids, sparsity=0.5)
    mask = torch.ones(3, 5, dtype=torch.long)
    with pytest.raises(CalibrationError, match=r"batch 0 \(input_ids: \(2, 8\), attention_mask"):
        pk.llm.prune(model, [{"input_ids": ids[:, :8], "attention_mask": mask}], sparsity=0.5)
    assert_unchanged(model, before)


# -- 5. exceptions inside a user's callback ------------------------------------------------


def blobs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (64,), generator=g)
    x = torch.randn(64, 8, generator=g) + 2.0 * y[:, None]
    return list(zip(x.split(16), y.split(16), strict=True))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def test_a_training_step_that_raises_is_named() -> None:
    def my_step(model: nn.Module, batch: object) -> torch.Tensor:
        raise KeyError("labels")

    model = tiny()
    with pytest.raises(UserCallbackError, match=r"training step .*my_step raised KeyError") as info:
        fit(model, blobs(), step=my_step, progress=False)
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(UserCallbackError, match=r"training step Supervised.* raised ValueError"):
        fit(model, [torch.randn(4, 8)], progress=False)  # batches that are not (x, y)


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (lambda m, x: m(x).sum(1), r"returned a loss of shape \(16,\)"),
        (lambda m, x: 1.0, "returned a loss of float"),
        (lambda m, x: m(x).sum().detach(), r"of shape \(\) without a gradient"),
    ],
)
def test_a_training_step_that_returns_no_scalar_loss(loss, message: str) -> None:
    model = tiny()
    before = snapshot(model)
    with pytest.raises(PruningError, match=message):
        fit(model, blobs(), step=lambda m, b: loss(m, b[0]), progress=False)
    assert_unchanged(model, before)


def test_an_evaluate_that_raises_or_returns_no_number() -> None:
    def my_evaluate(model: nn.Module) -> float:
        return 1 / 0

    model = tiny()
    before = snapshot(model)
    with pytest.raises(UserCallbackError, match=r"evaluate .*my_evaluate raised ZeroDivision"):
        iterative_pruning(model, blobs(), target=0.5, evaluate=my_evaluate, progress=False)
    with pytest.raises(PruningError, match=r"evaluate\(model\) returned 'high', not a number"):
        iterative_pruning(model, blobs(), target=0.5, evaluate=lambda m: "high", progress=False)
    assert_unchanged(model, before)


def test_a_criterion_function_that_raises_is_named(mlp: nn.Module) -> None:
    def my_scores(weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no scores today")

    before = snapshot(mlp)
    with pytest.raises(UserCallbackError, match=r"criterion my_scores \(scoring layer '0'\)"):
        pk.prune(mlp, 0.5, criterion=my_scores)
    with pytest.raises(PruningError, match=r"criterion <lambda> returned torch.complex64 scores"):
        pk.prune(mlp, 0.5, criterion=lambda w: torch.complex(w, w))
    assert_unchanged(mlp, before)


def test_a_users_criterion_class_that_raises_is_named(mlp: nn.Module) -> None:
    class Broken(pk.criteria.Criterion):
        name = "broken"

        def scores(self, units, ctx):
            return units.no_such_attribute

    before = snapshot(mlp)
    with pytest.raises(UserCallbackError, match=r"criterion broken .* raised AttributeError"):
        pk.prune(mlp, 0.5, criterion=Broken())
    assert_unchanged(mlp, before)


# -- 6. raw Python errors where user input reached torch / files unchecked --------------------


def test_a_training_step_that_is_not_callable() -> None:
    with pytest.raises(PruningError, match=r"step=3 is not callable"):
        fit(tiny(), blobs(), step=3, progress=False)


def test_a_users_cost_function_in_convert(mlp: nn.Module) -> None:
    pk.prune(mlp, 0.9)
    before = snapshot(mlp)
    with pytest.raises(UserCallbackError, match=r"cost .*raised ZeroDivisionError") as info:
        pk.sparse.convert(mlp, "auto", cost=lambda candidate: 1 / 0)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(PruningError, match=r"returned 'cheap', not a number"):
        pk.sparse.convert(mlp, "auto", cost=lambda candidate: "cheap")
    with pytest.raises(PruningError, match=r"margin='x' must be in \(0, 1\]"):
        pk.sparse.convert(mlp, "auto", margin="x")
    assert_unchanged(mlp, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spec": None}, "model spec None is not a string"),
        ({"spec": "lenet5", "kwargs": [1]}, r"kwargs=\[1\] is not a mapping"),
        ({"spec": "lenet5", "checkpoint": 3}, "checkpoint=3 is not a path"),
    ],
)
def test_load_model_argument_types(kwargs: dict, message: str) -> None:
    spec = kwargs.pop("spec")
    with pytest.raises(ModelSpecError, match=message):
        model_spec.load_model(spec, **kwargs)


@pytest.mark.parametrize(
    ("calibration", "batch_size", "message"),
    [
        (torch.zeros(2, 3, 4, dtype=torch.long), 8, r"has shape \(2, 3, 4\)"),
        ([{"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": [1]}], 8,
         "'attention_mask' is a list, not a tensor"),
        (torch.zeros(2, 3, dtype=torch.long), 0, "batch_size=0 is not an int >= 1"),
    ],
)  # fmt: skip
def test_calibration_of_the_wrong_form(calibration, batch_size: int, message: str) -> None:
    from prunekit.llm.calibration import calibration_batches

    with pytest.raises(CalibrationError, match=message):
        calibration_batches(calibration, tiny(), batch_size)
