"""Depth pruning of a causal LM: which whole blocks (layers) to remove, and removing them.

With ``x_l`` the hidden state entering block ``l`` (``x_L`` leaves the last block, before
the final norm) and ``cos`` the cosine similarity over the hidden dimension:

- **Block Influence** (ShortGPT, Men et al. 2024): ``BI_l = 1 - E[cos(x_l, x_{l+1})]``,
  the expectation over every real token of the calibration set (padding ignored); a
  block that barely turns its input is unimportant.
- **Angular distance** of ``n`` consecutive blocks (Gromov et al. 2024, "The Unreasonable
  Ineffectiveness of the Deeper Layers"): ``d(l, n) = arccos(cos(x_l, x_{l+n})) / pi`` at
  the last real token of each sequence (as in the paper), averaged over samples; the
  ``n`` blocks ``l .. l+n-1`` with the least distance are removed together.
- **Loss when dropped**: the calibration next-token loss with block ``l`` skipped (its
  output replaced by its input) minus the loss of the whole model; ``exp`` of it is the
  perplexity ratio (Minitron's "PPL" layer importance).

:func:`drop_layers` removes blocks in place and renumbers everything indexed by layer:
each attention's ``layer_idx`` (the KV cache slot), ``config.num_hidden_layers`` and every
per-layer config list (``layer_types``: sliding / full attention), so ``generate()`` and a
``save_pretrained`` / ``from_pretrained`` round trip see a consistent model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import IncompatibleLayerError, PruningError, UnknownChoiceError
from prunekit.inputs import eval_mode
from prunekit.llm.anatomy import Anatomy, describe
from prunekit.llm.calibration import Batch, TokenData, calibration_batches
from prunekit.llm.width import lm_loss, token_mask

DEPTH_IMPORTANCE = ("bi", "angular", "loss")


def _first(out: object) -> Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[return-value]


@contextmanager
def _states(anatomy: Anatomy, store: list[Tensor]) -> Iterator[None]:
    """Append ``x_0 .. x_L`` (module docstring) to ``store`` during each forward."""
    blocks = anatomy.blocks
    handles = [
        b.register_forward_pre_hook(
            lambda m, args, kwargs: store.append(
                (args[0] if args else kwargs["hidden_states"]).detach().float()
            ),
            with_kwargs=True,
        )
        for b in blocks
    ]
    handles.append(
        blocks[-1].register_forward_hook(
            lambda m, a, out: store.append(_first(out).detach().float())
        )
    )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _trace(
    model: nn.Module, batches: list[Batch], reduce: Callable[[list[Tensor], Tensor], None]
) -> None:
    """Run every batch and hand ``reduce(states, mask)`` the block boundary states."""
    anatomy = describe(model)
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            store: list[Tensor] = []
            with _states(anatomy, store):
                model(**batch, use_cache=False)
            reduce(store, token_mask(batch).to(store[0].device))


def block_influence(model: nn.Module, data: TokenData, *, batch_size: int = 8) -> Tensor:
    """``BI_l`` of every block (module docstring): ``(layers,)``, higher = more important."""
    batches = calibration_batches(data, model, batch_size)
    sums: list[Tensor] = []
    tokens = [0.0]

    def reduce(states: list[Tensor], mask: Tensor) -> None:
        cos = torch.stack(
            [F.cosine_similarity(a, b, dim=-1) for a, b in itertools.pairwise(states)]
        )
        total = (cos * mask).sum((1, 2)).cpu()
        sums.append(total)
        tokens[0] += float(mask.sum())

    _trace(model, batches, reduce)
    return 1 - torch.stack(sums).sum(0) / tokens[0]


def last_token(mask: Tensor) -> Tensor:
    """Index of the last real token of each row of a ``(batch, seq)`` mask."""
    return mask.shape[1] - 1 - mask.flip(1).argmax(1)


def angular_distance(
    model: nn.Module, data: TokenData, n: int = 1, *, batch_size: int = 8
) -> Tensor:
    """``d(l, n)`` for every start ``l = 0 .. layers - n`` (module docstring): lower = the
    ``n`` blocks from ``l`` change the representation less."""
    layers = len(describe(model).blocks)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= layers:
        raise PruningError(
            f"n={n!r} is not an int 1..{layers} (the model's blocks); Fix: e.g. n=1."
        )
    batches = calibration_batches(data, model, batch_size)
    sums: list[Tensor] = []

    def reduce(states: list[Tensor], mask: Tensor) -> None:
        rows = torch.arange(mask.shape[0], device=mask.device)
        last = torch.stack([s[rows, last_token(mask)] for s in states])  # (L + 1, B, H)
        cos = F.cosine_similarity(last[:-n], last[n:], dim=-1).clamp(-1, 1)
        sums.append((torch.arccos(cos) / math.pi).sum(1).cpu())

    _trace(model, batches, reduce)
    samples = sum(len(b["input_ids"]) for b in batches)
    return torch.stack(sums).sum(0) / samples


@contextmanager
def _skipped(block: nn.Module) -> Iterator[None]:
    def hook(module: nn.Module, args: tuple, kwargs: dict, out: object) -> object:
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def drop_loss(model: nn.Module, data: TokenData, *, batch_size: int = 8) -> Tensor:
    """Calibration loss increase when each block is skipped: ``(layers,)``, higher = more
    important (one pass over the data per block, plus one)."""
    batches = calibration_batches(data, model, batch_size)
    blocks = describe(model).blocks
    weights = [float(token_mask(b)[:, 1:].sum()) for b in batches]

    def loss() -> float:
        total = sum(float(lm_loss(model, b)) * w for b, w in zip(batches, weights, strict=True))
        return total / sum(weights)

    with torch.no_grad(), eval_mode(model):
        base = loss()
        drops = []
        for block in blocks:
            with _skipped(block):
                drops.append(loss() - base)
    return torch.tensor(drops)


def choose_layers(
    model: nn.Module, count: int, data: TokenData, *, method: str = "bi", batch_size: int = 8
) -> tuple[int, ...]:
    """The ``count`` blocks to remove, sorted: the least important by ``bi`` or ``loss``,
    or the contiguous run with the least ``angular`` distance."""
    if method not in DEPTH_IMPORTANCE:
        raise UnknownChoiceError("depth importance", method, list(DEPTH_IMPORTANCE))
    if count == 0:
        return ()
    if method == "angular":
        start = int(angular_distance(model, data, count, batch_size=batch_size).argmin())
        return tuple(range(start, start + count))
    scores = (block_influence if method == "bi" else drop_loss)(model, data, batch_size=batch_size)
    return tuple(sorted(torch.argsort(scores, stable=True)[:count].tolist()))


def check_drop(anatomy: Anatomy, indices: Sequence[int]) -> tuple[int, ...]:
    """``indices`` validated (ints in range, distinct, at least one block left), sorted."""
    layers = len(anatomy.blocks)
    bad = [
        i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers
    ]
    if bad or len(set(indices)) != len(indices) or len(indices) >= layers:
        raise PruningError(
            f"drop_layers={list(indices)!r} for a model of {layers} blocks: need distinct "
            f"block indices 0..{layers - 1}, leaving at least one; Fix: e.g. "
            f"drop_layers=[{layers - 1}]."
        )
    config = anatomy.model.config
    if indices and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise IncompatibleLayerError(
            "GPT-2 with scale_attn_by_inverse_layer_idx scales each attention by its layer "
            "index, so removing blocks changes the remaining ones; Fix: prune width only."
        )
    return tuple(sorted(indices))


def drop_layers(model: nn.Module, indices: Sequence[int]) -> tuple[int, ...]:
    """Remove the blocks ``indices`` in place and renumber (module docstring); returns the
    removed indices, sorted. Validated before anything changes."""
    anatomy = describe(model)
    indices = check_drop(anatomy, list(indices))
    old = len(anatomy.blocks)
    keep = [i for i in range(old) if i not in indices]
    parent_name, _, attr = anatomy.blocks_path.rpartition(".")
    setattr(
        model.get_submodule(parent_name), attr, nn.ModuleList([anatomy.blocks[i] for i in keep])
    )
    for new, block in enumerate(getattr(model.get_submodule(parent_name), attr)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config
    for name, value in list(vars(config).items()):
        if "layer" in name and isinstance(value, list | tuple) and len(value) == old:
            setattr(config, name, type(value)(value[i] for i in keep))
    config.num_hidden_layers = len(keep)
    return indices
