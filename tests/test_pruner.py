"""pk.Pruner: scheduled pruning inside real training loops, masks that only grow,
resumable state, validation before anything is touched, and the training integrations."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import prunekit as pk
from prunekit.errors import PrunerStateError, ScheduleError
from prunekit.masks import get_mask
from prunekit.pruner import Pruner
from prunekit.schedules import Cubic, Iterative, OneShot
from prunekit.training import train_with_pruner
from prunekit.zoo import LeNet300100, evaluate, load_dataset, train


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8)
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 32, generator=g), torch.randint(0, 8, (16,), generator=g)


def sgd_steps(model, pruner, opt, steps, after=lambda step: None):
    for _ in range(steps):
        x, y = batch(pruner.step_count)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        after(pruner.step_count)


def masks(model) -> list[torch.Tensor]:
    return [get_mask(m) for m in model if isinstance(m, nn.Linear)]


def numel(model) -> int:
    return sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))


@pytest.mark.parametrize(
    "schedule", [Iterative(3, 4, start=2, spacing="geometric"), Cubic(0, 12, 3), OneShot(at=5)]
)
def test_sgd_momentum_loop_follows_schedule_and_masks_only_grow(schedule):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    pruner = Pruner(model, target=0.8, schedule=schedule, scope="global", include_output=True)
    previous = [None] * 3

    def check(step):
        # exact up to one element, counted over the selected layers
        assert abs(pruner.sparsity - schedule.target(step, 0.8)) <= 1 / numel(model)
        for i, (layer, mask) in enumerate(zip([0, 2, 4], masks(model), strict=True)):
            if mask is None:
                continue
            assert torch.all(model[layer].weight[~mask] == 0)  # momentum cannot revive
            if previous[i] is not None:
                assert not torch.any(mask & ~previous[i])  # pruned stays pruned
            previous[i] = mask

    sgd_steps(model, pruner, opt, schedule.end + 5, check)
    assert pruner.sparsity == pytest.approx(0.8, abs=1 / numel(model))
    zeros = sum(int((m.weight == 0).sum()) for m in model if isinstance(m, nn.Linear))
    assert zeros >= round(0.8 * numel(model))
    assert [e.step for e in pruner.history] == [m for m in schedule.milestones() if m >= 1]
    assert pruner.history[-1].target == 0.8


def test_milestones_below_the_current_sparsity_leave_masks_alone():
    model = make_mlp()
    pk.prune(model, 0.5, scope="global", include_output=True)
    before = [m.clone() for m in masks(model)]
    pruner = Pruner(model, 0.6, schedule=Iterative(3, 1), scope="global", include_output=True)
    assert pruner.step() is None and pruner.step() is None  # targets 0.2, 0.4 < 0.5
    assert all(torch.equal(a, b) for a, b in zip(before, masks(model), strict=True))
    assert [e.achieved for e in pruner.history] == [pytest.approx(0.5)] * 2
    report = pruner.step()
    assert report is not None and report.sparsity == pytest.approx(0.6, abs=1e-3)


def test_data_driven_criterion_and_nm():
    model = make_mlp()
    data = [batch(i) for i in range(2)]
    pruner = Pruner(
        model, 0.5, criterion="taylor", scope="local", data=data, schedule=Iterative(2, 1)
    )
    pruner.step(), pruner.step()
    assert pruner.sparsity == pytest.approx(0.5, abs=1e-3)
    nm = Pruner(make_mlp(), 0.5, granularity="2:4")
    assert nm.step().granularity == "2:4" and nm.sparsity == 0.5


def test_state_dict_round_trip_resumes_the_same_schedule():
    schedule = Cubic(start=0, end=20, every=4)

    def start(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return opt, Pruner(model, 0.7, schedule=schedule)

    whole = make_mlp()
    opt, pruner = start(whole)
    sgd_steps(whole, pruner, opt, 30)

    first = make_mlp()
    opt, pruner = start(first)
    sgd_steps(first, pruner, opt, 9)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    saved = json.dumps(pruner.state_dict())  # plain JSON

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = make_mlp()
    opt, pruner = start(resumed)  # optimizer first: it sees the parameters in their order
    pk.masks.load_state_dict(resumed, checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    pruner.load_state_dict(json.loads(saved))
    assert pruner.step_count == 9 and len(pruner.history) == 2
    sgd_steps(resumed, pruner, opt, 21)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ("garbage", "not a Pruner state"),
        ({"target": 0.5}, "not a Pruner state"),
        (lambda s: {**s, "target": 0.8}, r"'target': 0\.8"),
        (lambda s: {**s, "schedule": {"type": "OneShot", "at": 1}}, "'OneShot'"),
        (lambda s: {**s, "step": -3}, "step=-3"),
        (lambda s: {**s, "history": [[1, 2]]}, "history is not a list"),
    ],
)
def test_bad_state_raises_and_keeps_the_pruner(state, match):
    pruner = Pruner(make_mlp(), 0.7, schedule=Cubic(0, 20, 4))
    pruner.step()
    state = state(pruner.state_dict()) if callable(state) else state
    with pytest.raises(PrunerStateError, match=match):
        pruner.load_state_dict(state)
    assert pruner.step_count == 1


CASES = [
    (dict(target=1.0), pk.InvalidSparsityError, r"target=1\.0"),
    (dict(target=0.2), pk.InvalidSparsityError, r"target=0\.2 is below .* \(0\.3\)"),
    (dict(granularity="diagonal"), pk.UnknownChoiceError, "'diagonal'"),
    (dict(criterion="hessian"), pk.UnknownChoiceError, "'hessian'"),
    (dict(scope="regional"), pk.PruningError, "'regional'"),
    (dict(criterion="taylor"), pk.MissingDataError, "needs calibration batches"),
    (dict(criterion="taylor", data=iter([])), pk.MissingDataError, "list_iterator"),
    (dict(layers="nothing*"), pk.NoLayersError, r"nothing\*"),
    (dict(schedule="cubic"), ScheduleError, "schedule='cubic'"),
    (dict(target=0.5, granularity="2:4", schedule=Cubic(0, 9, 3)), ScheduleError, "'2:4'"),
    (dict(target=0.3, granularity="2:4"), pk.InvalidSparsityError, "fixes sparsity at 0.5"),
    (dict(schedule=Cubic(0, 9, 3, initial=0.95)), ScheduleError, r"initial=0\.95"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), CASES)
def test_bad_input_raises_before_touching_the_model(kwargs, error, match):
    model = make_mlp()
    pk.prune(model, 0.3, scope="global", include_output=True)  # masks must stay too
    before = snapshot(model)
    with pytest.raises(error, match=match):
        Pruner(model, **{"target": 0.9, "include_output": True, **kwargs})
    assert_unchanged(model, before)


def test_gradual_magnitude_pruning_reaches_90_percent_with_dense_accuracy():
    data = load_dataset("digits")
    kwargs = dict(optimizer="sgd", batch_size=64, seed=0, progress=False)
    torch.manual_seed(0)
    dense = LeNet300100(in_features=64)
    train(dense, data, epochs=12, lr=0.05, **kwargs)
    torch.manual_seed(0)
    model = LeNet300100(in_features=64)
    pruner = Pruner(model, 0.9, schedule=Cubic(start=0, end=180, every=20), scope="global",
                    include_output=True)  # 23 steps/epoch; every layer, as Zhu & Gupta
    train_with_pruner(model, data, pruner, epochs=12, lr=0.05, **kwargs)
    total = sum(m.weight.numel() for m in (model.fc1, model.fc2, model.fc3))
    zeros = sum(int((m.weight == 0).sum()) for m in (model.fc1, model.fc2, model.fc3))
    assert abs(zeros - round(0.9 * total)) <= 1  # one group (element) of slack
    acc_dense = evaluate(dense, data.x_test, data.y_test)
    acc_sparse = evaluate(model, data.x_test, data.y_test)
    assert acc_dense > 0.9
    assert acc_sparse >= acc_dense - 0.03  # GMP at 90% within 3 points of dense


def test_train_with_pruner_rejects_a_schedule_ending_after_training():
    data = load_dataset("digits")
    model = LeNet300100(in_features=64)
    pruner = Pruner(model, 0.9, schedule=Cubic(0, 100, 10))
    before = snapshot(model)
    with pytest.raises(ScheduleError, match=r"ends at step 100, but training stops at step 46"):
        train_with_pruner(model, data, pruner, epochs=2, lr=0.05, progress=False)
    with pytest.raises(pk.PruningError, match="not the Pruner's model"):
        train_with_pruner(make_mlp(), data, pruner, epochs=5, lr=0.05, progress=False)
    assert_unchanged(model, before)
    assert pruner.step_count == 0


def test_transformers_callback_steps_the_pruner_like_trainer_does():
    from transformers import TrainerControl, TrainerState
    from transformers.trainer_callback import CallbackHandler

    from prunekit.training import PruningCallback

    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(model, 0.75, schedule=Cubic(0, 8, 2))
    handler = CallbackHandler([PruningCallback(pruner)], model, None, opt, None)
    state, control = TrainerState(), TrainerControl()
    handler.on_train_begin(None, state, control)
    for step in range(10):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        state.global_step += 1
        handler.on_step_end(None, state, control)
    assert pruner.step_count == 10 and pruner.sparsity == pytest.approx(0.75, abs=1e-3)

    fresh = Pruner(make_mlp(), 0.75, schedule=Cubic(0, 8, 2))
    resumed = CallbackHandler([PruningCallback(fresh)], fresh.model, None, None, None)
    with pytest.raises(PrunerStateError, match="Trainer starts at step 10, the Pruner at step 0"):
        resumed.on_train_begin(None, state, control)
    with pytest.raises(pk.PruningError, match="not the Pruner's model"):
        CallbackHandler([PruningCallback(fresh)], model, None, None, None).on_train_begin(
            None, TrainerState(), control
        )


def test_real_transformers_trainer_reaches_the_exact_sparsity(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    from prunekit.training import PruningCallback
    from prunekit.zoo.hf import tiny_transformer

    model, _ = tiny_transformer("gpt2")
    ids = torch.randint(0, 100, (32, 12), generator=torch.Generator().manual_seed(0))
    layers = "transformer.h.*"  # the blocks' Conv1D layers; wte is tied to the head
    pruner = Pruner(model, target=0.5, layers=layers, schedule=Cubic(start=0, end=4, every=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)  # fmt: skip
    data = [{"input_ids": x, "labels": x} for x in ids]
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=[PruningCallback(pruner)]
    )
    trainer.train()
    assert trainer.state.global_step == pruner.step_count == 6
    assert [(e.step, e.target) for e in pruner.history] == [(2, pytest.approx(0.4375)), (4, 0.5)]
    report = pk.sparsity(model, layers=layers)
    assert report.numel == 24576 and report.zeros == 12288  # exactly half, after AdamW steps


def test_training_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import prunekit.training as t\n"
        "assert callable(t.train_with_pruner)\n"
        "try:\n    t.PruningCallback\nexcept ImportError:\n    print('lazy')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lazy"
