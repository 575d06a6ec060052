"""Tests for the model zoo, the offline datasets and the trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit import zoo
from prunekit.errors import UnknownChoiceError, UserCallbackError
from prunekit.zoo import (
    MODELS,
    LeNet5,
    LeNet300100,
    ResNet20,
    batches,
    build_model,
    calibration_batches,
    evaluate,
    example_input,
    load_dataset,
    torchvision_init,
    train,
)

EXPECTED_OUT = {"gpt": (2, 16, 128)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_model_forward(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    out = model(example_input(name, batch_size=2))
    assert out.shape == EXPECTED_OUT.get(name, (2, 10))
    assert torch.isfinite(out).all()


def test_lenet_shapes_and_flat_input() -> None:
    model = LeNet5()
    assert model.fc1.in_features == 256
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(model(x), model(x.flatten(1)))
    mlp = LeNet300100()
    assert [mlp.fc1.out_features, mlp.fc2.out_features, mlp.fc3.out_features] == [300, 100, 10]
    torch.testing.assert_close(mlp(x), mlp(x.flatten(1)))


def test_resnet_blocks_per_stage() -> None:
    small = ResNet20(blocks_per_stage=1)
    assert len(small.layers) == 3 and len(ResNet20().layers) == 9
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_names_raise() -> None:
    with pytest.raises(UnknownChoiceError, match=", ".join(sorted(MODELS))):
        build_model("alexnet")
    with pytest.raises(UnknownChoiceError, match="digits, mnist1d, mnist5k"):
        load_dataset("cifar10")


@pytest.mark.parametrize(
    ("name", "n_train", "n_test", "shape"),
    [
        ("digits", 1437, 360, (1, 8, 8)),
        ("mnist5k", 4000, 1000, (1, 28, 28)),
        ("mnist1d", 4000, 1000, (1, 40)),
    ],
)
def test_dataset_shapes(name: str, n_train: int, n_test: int, shape: tuple) -> None:
    ds = load_dataset(name)
    assert ds.x_train.shape == (n_train, *shape) and ds.x_test.shape == (n_test, *shape)
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == shape and ds.num_classes == 10
    assert set(ds.y_test.tolist()) == set(range(10)) == set(ds.y_train.tolist())
    flat = load_dataset(name, flat=True)
    assert flat.x_train.shape == (n_train, torch.Size(shape).numel())
    assert load_dataset(name) is ds  # cached


def test_dataset_normalisation() -> None:
    assert 0.0 <= load_dataset("digits").x_train.min() < load_dataset("digits").x_train.max() <= 1
    mnist = load_dataset("mnist5k")
    assert abs(mnist.x_train.mean().item()) < 0.2
    assert 0.8 < mnist.x_train.std().item() < 1.2


def test_batches_cover_all_samples() -> None:
    x, y = torch.arange(10.0), torch.arange(10)
    chunks = list(batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(xb) for xb, _ in chunks] == [4, 4, 2]
    assert sorted(torch.cat([yb for _, yb in chunks]).tolist()) == list(range(10))
    assert all(torch.equal(xb.long(), yb) for xb, yb in chunks)


def test_calibration_batches() -> None:
    cal = calibration_batches(load_dataset("digits"), n_batches=3, batch_size=16)
    assert len(cal) == 3 and all(xb.shape == (16, 1, 8, 8) for xb, _ in cal)


def test_train_lenet300_mnist5k() -> None:
    ds = load_dataset("mnist5k", flat=True)
    torch.manual_seed(0)
    model = LeNet300100()
    steps: list[int] = []
    losses = train(model, ds, epochs=1, progress=False, callback=steps.append)
    assert steps == list(range(1, 64)) and len(losses) == 1
    model.train()
    assert evaluate(model, ds.x_test, ds.y_test) > 0.85
    assert model.training  # evaluate restores the mode


def test_train_is_deterministic() -> None:
    ds = load_dataset("digits", flat=True)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = LeNet300100(in_features=64)
        train(model, (ds.x_train, ds.y_train), optimizer="sgd", lr=0.05, seed=3, progress=False)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], rtol=0, atol=0)


def test_train_gpt_and_unknown_optimizer() -> None:
    torch.manual_seed(0)
    model = build_model("gpt")
    tokens = torch.randint(0, 128, (8, 17))
    losses = train(model, (tokens[:, :-1], tokens[:, 1:]), epochs=2, batch_size=4, progress=False)
    assert len(losses) == 2
    with pytest.raises(UnknownChoiceError, match="adam, sgd"):
        train(model, (tokens[:, :-1], tokens[:, 1:]), optimizer="lbfgs")


def test_train_restores_every_modules_own_mode_even_on_error() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[1].eval()  # frozen statistics, as a user may set them
    data = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    zoo.train(model, data, epochs=1, progress=False)
    assert [m.training for m in model] == [True, False, True]

    def failing_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    model.eval()
    with pytest.raises(UserCallbackError, match="boom") as info:
        zoo.train(model, data, epochs=1, progress=False, loss_fn=failing_loss)
    assert isinstance(info.value.__cause__, RuntimeError)  # the user's loss, named and kept
    assert not any(m.training for m in model.modules())


def test_torchvision_init_draws_kaiming_fan_out_and_keeps_the_signal() -> None:
    """Convs N(0, 2 / fan_out), biases and BatchNorm shifts 0, layers without a bias or an
    affine taken as they are; a deep random CNN's output then depends on its input."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 256, 3)
    model = nn.Sequential(conv, nn.BatchNorm2d(256, affine=False), nn.Linear(4, 2, bias=False))
    assert torchvision_init(model) is model
    assert float(conv.weight.std()) == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)
    assert not conv.bias.any()
    deep = torchvision_init(build_model("mobilenetv2")).eval()
    x = example_input("mobilenetv2", 2)
    with torch.no_grad():
        y = deep(x)
    assert float((y[0] - y[1]).abs().max()) > 1e-2 * float(y.abs().max())
