"""A lightning.Trainer drives a Pruner through LightningPruning; its checkpoints carry the
Pruner's state and masks, and a fit resumed from one ends bit-exact as the uninterrupted one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunekit import Pruner
from prunekit.schedules import Cubic

pl = pytest.importorskip("lightning.pytorch")


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, epochs, ckpt_path=None):
    from prunekit.training.callbacks import LightningPruning

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    module = Module()
    pruner = Pruner(
        module.model, target=0.5, scope="local", schedule=Cubic(start=0, end=6, every=2)
    )
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path,
                         callbacks=[LightningPruning(pruner)])  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    trainer.save_checkpoint(tmp_path / f"epoch{epochs}.ckpt")
    return module, pruner


def test_lightning_steps_the_pruner_and_resumes_bit_exact(tmp_path):
    whole, pruner = fit(tmp_path, epochs=3)
    assert pruner.step_count == 12 and pruner.sparsity == pytest.approx(0.5, abs=1e-3)
    fit(tmp_path / "part", epochs=1)  # 4 steps: pruned at 2 and 4, not yet at 6
    resumed, again = fit(tmp_path / "part", epochs=3, ckpt_path=tmp_path / "part" / "epoch1.ckpt")
    assert again.step_count == 12 and again.history == pruner.history
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
