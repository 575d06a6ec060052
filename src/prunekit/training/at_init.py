"""Pruning before training (chapter 3.6.3): iterative SynFlow and the sanity controls.

- :func:`synflow_prune`: SynFlow scores (``prunekit.criteria.SynFlow``) applied over
  ``rounds`` rounds on the exponential schedule ``s_k = 1 - (1 - s)^(k / rounds)``
  (Tanaka et al. 2020: 100 rounds), each round scoring the network masked so far; global
  scope, so it never needs data, only the input shape.
- ``snip`` and ``grasp`` are one-shot: ``pk.prune(model, s, criterion="snip", scope=
  "global", data=batches)`` at initialisation.
- Controls (Frankle et al. 2021, "Pruning neural networks at initialization: why are we
  missing the mark?"): :func:`shuffle_masks` permutes each layer's mask (same per-layer
  density, random positions) and :func:`reinitialize` draws fresh weights under the same
  masks. When the accuracy survives these, the method chose per-layer densities, not
  individual weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunekit.allocation import check_sparsity
from prunekit.errors import PruningError
from prunekit.inputs import Inputs
from prunekit.masks import apply_mask, get_mask, remove, set_mask, tie_masks
from prunekit.pruning import PruneReport, prune
from prunekit.schedules import check_int, geometric


def synflow_prune(
    model: nn.Module,
    sparsity: float,
    example_inputs: Inputs,
    *,
    rounds: int = 100,
    granularity: str = "element",
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    include_output: bool = False,
    include_embeddings: bool = False,
) -> PruneReport:
    """Iterative SynFlow to ``sparsity`` in ``rounds`` rounds; returns the last round's report.
    The output layer and the embeddings stay dense unless ``include_output`` /
    ``include_embeddings`` (as in :func:`prunekit.prune`)."""
    sparsity = check_sparsity(sparsity)
    check_int("rounds", rounds, 1, "e.g. rounds=100")
    report = None
    for k in range(1, rounds + 1):
        report = prune(
            model, geometric(sparsity, k / rounds), granularity=granularity,
            criterion="synflow", scope="global", layers=layers, exclude=exclude,
            include_output=include_output, include_embeddings=include_embeddings,
            data=[example_inputs],
        )  # fmt: skip
    assert report is not None
    return report


def _masked(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    out = [(m, mask) for m in model.modules() if (mask := get_mask(m)) is not None]
    if not out:
        raise PruningError("the model has no masks; Fix: prune it first (pk.prune).")
    return out


def shuffle_masks(model: nn.Module, seed: int = 0) -> None:
    """Randomly permute every layer's mask in place: per-layer densities kept, positions not."""
    gen = torch.Generator().manual_seed(seed)
    for module, mask in _masked(model):
        order = torch.randperm(mask.numel(), generator=gen)
        set_mask(module, mask.flatten()[order].view_as(mask))


def reinitialize(model: nn.Module, seed: int = 0) -> None:
    """Draw fresh weights (each module's own ``reset_parameters``) under the same masks."""
    torch.manual_seed(seed)
    for module, mask in _masked(model):
        remove(module)  # reset_parameters must write the stored weight, not the masked view
        module.reset_parameters()
        apply_mask(module, mask)
    tie_masks(model)  # a tied weight keeps one mask, shared by every module using it
