"""Reference models, offline datasets and a small trainer for pruning experiments."""

from prunekit.training.data import batches
from prunekit.zoo.data import Dataset, load_dataset
from prunekit.zoo.models import (
    MODELS,
    LeNet5,
    LeNet300100,
    MobileNetV2Small,
    ResNet20,
    SmallVGG,
    TinyGPT,
    TinyViT,
    build_model,
    example_input,
    torchvision_init,
)
from prunekit.zoo.train import calibration_batches, evaluate, train

__all__ = [
    "MODELS",
    "Dataset",
    "LeNet5",
    "LeNet300100",
    "MobileNetV2Small",
    "ResNet20",
    "SmallVGG",
    "TinyGPT",
    "TinyViT",
    "batches",
    "build_model",
    "calibration_batches",
    "evaluate",
    "example_input",
    "load_dataset",
    "torchvision_init",
    "train",
]
