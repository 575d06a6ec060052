"""transformers.Trainer checkpoints carry the Pruner's state and masks (PruningCallback):
a run resumed from one with a fresh model and Pruner ends bit-exact as the uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from prunekit import Pruner
from prunekit.schedules import Cubic

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")


def run(out, resume=None):
    from transformers import Trainer, TrainingArguments

    from prunekit.training import PruningCallback
    from prunekit.zoo.hf import tiny_transformer

    torch.manual_seed(0)
    model, _ = tiny_transformer("gpt2")
    ids = torch.randint(0, 100, (32, 12), generator=torch.Generator().manual_seed(0))
    pruner = Pruner(model, target=0.5, layers="transformer.h.*",
                    schedule=Cubic(start=0, end=4, every=2))  # fmt: skip
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_steps=2,
                             logging_strategy="no", disable_tqdm=True, seed=0)  # fmt: skip
    data = [{"input_ids": x, "labels": x} for x in ids]
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=[PruningCallback(pruner)]
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, pruner


def test_trainer_checkpoints_resume_the_pruner_bit_exact(tmp_path):
    from prunekit.training.callbacks import PRUNER_FILE

    whole, pruner = run(tmp_path)
    assert (tmp_path / "checkpoint-2" / PRUNER_FILE).is_file()
    assert not list(tmp_path.glob("checkpoint-2/.*"))  # atomic: no temporary left
    resumed, again = run(tmp_path, resume=str(tmp_path / "checkpoint-2"))  # before the 2nd prune
    assert again.step_count == pruner.step_count == 4 and again.history == pruner.history
    expected = whole.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(resumed.state_dict()[key], value), key
