"""Prune, fine-tune and shrink a vision model that is not from prunekit's zoo.

The model is transformers' ``ResNetForImageClassification`` built from a ``ResNetConfig``
(random initialisation: nothing is downloaded), the data scikit-learn's 8x8 digits
upsampled to 32x32 and served by a ``torch.utils.data.DataLoader``:

1. train the dense network (``pk.training.fit`` with our own training step);
2. remove half the filters of the first convolution of every residual block, ranked by
   L2 norm, physically (``pk.shrink``; the convs that feed the residual sums and the
   classifier keep every channel): the result is a smaller dense ResNet, checked to
   compute what the network with those filters (and their BatchNorm channels) zeroed
   computes;
3. fine-tune the smaller network;
4. save it (``pk.save_shrunk``) and load it into a fresh model built from the same
   config (``pk.load_shrunk``): same outputs, fewer parameters and MACs.

Masking first (``pk.prune(granularity="filter")``), fine-tuning with the masks and then
``pk.shrink(ratio=None)`` also works, but a masked filter's BatchNorm still adds its bias
after the zeroed convolution, so removing the channel changes the outputs; shrinking
before fine-tuning has no such gap.

    python examples/hf_vision_shrink.py           # the full run
    python examples/hf_vision_shrink.py --quick   # a smoke run: the same path, small (CI runs it)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import ResNetConfig, ResNetForImageClassification

import prunekit as pk

# The channels inside each residual block (the first conv's filters, its BatchNorm and
# the second conv's inputs); the families of the residual streams keep every channel.
INNER = {"resnet.encoder.stages.*.layers.*.layer.0.convolution": 0.5}


def loaders(batch_size: int, limit: int | None, seed: int) -> tuple[DataLoader, DataLoader]:
    """Train / test loaders over digits upsampled to 1x32x32, normalised, 80/20 split."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order][:limit], y[order][:limit]
    cut = int(0.8 * len(y))
    train = DataLoader(TensorDataset(x[:cut], y[:cut]), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    test = DataLoader(TensorDataset(x[cut:], y[cut:]), batch_size=256)
    return train, test


def build(width: int) -> nn.Module:
    """A 3-stage basic-block ResNet for 1-channel 32x32 images and 10 classes."""
    config = ResNetConfig(num_channels=1, embedding_size=width,
                          hidden_sizes=[width, 2 * width, 4 * width], depths=[1, 1, 1],
                          layer_type="basic", num_labels=10)
    return ResNetForImageClassification(config)


def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Our own training step: the loss transformers computes from ``labels``."""
    x, y = batch
    return model(pixel_values=x, labels=y).loss


@torch.no_grad()
def accuracy(model: nn.Module, test: DataLoader) -> float:
    """Top-1 accuracy over ``test`` in eval mode (the caller's mode is restored)."""
    was_training = model.training
    model.eval()
    right = sum(int((model(pixel_values=x).logits.argmax(-1) == y).sum()) for x, y in test)
    model.train(was_training)
    return right / len(test.dataset)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the four steps; returns the accuracies and the size ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny and short")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/hf-resnet-shrunk", help="save_shrunk folder")
    args = parser.parse_args(argv)
    epochs, finetune, width, limit = (1, 1, 8, 240) if args.quick else (8, 3, 16, None)
    torch.manual_seed(args.seed)
    train, test = loaders(64, limit, args.seed)
    model = build(width)
    pk.training.fit(model, train, epochs=epochs, lr=3e-3, step=step, progress=False)
    dense = accuracy(model, test)

    example = next(iter(test))[0][:8]            # real images: verify sees them
    report = pk.shrink(model, example, ratio=INNER, criterion="l2")
    print(report)
    pruned = accuracy(model, test)
    pk.training.fit(model, train, epochs=finetune, lr=1e-3, step=step, progress=False)
    tuned = accuracy(model, test)

    pk.save_shrunk(model, args.out)
    fresh = pk.load_shrunk(build(width), args.out)
    with torch.no_grad():
        same = torch.equal(fresh.eval()(example).logits, model.eval()(example).logits)
    print(f"accuracy: dense {dense:.3f}, shrunk {pruned:.3f}, fine-tuned {tuned:.3f}; "
          f"reloaded from {args.out}: {'same' if same else 'DIFFERENT'} outputs")
    return {"dense": dense, "shrunk": pruned, "finetuned": tuned, "reloaded_same": same,
            "params": report.params_after / report.params_before,
            "macs": report.macs_after / report.macs_before}


if __name__ == "__main__":
    main()
