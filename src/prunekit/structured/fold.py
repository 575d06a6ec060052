"""BatchNorm folding for inference: ``conv -> BatchNorm`` becomes one conv with a bias.

In eval mode a BatchNorm is an affine map per channel, so it folds into the layer that
produces its input (Ioffe & Szegedy 2015; the standard inference rewrite):

    s  = gamma / sqrt(running_var + eps)
    W' = W * s   (per output channel)        b' = (b - running_mean) * s + beta

and the BatchNorm becomes ``nn.Identity``: the folded model computes the same outputs
(to float rounding) without paying for the BatchNorm. Producers are ``nn.Conv1d/2d/3d``
(any groups) and ``nn.Linear``; BatchNorms are ``nn.BatchNorm1d/2d/3d`` with running
statistics.

Pairs are found from one forward pass on ``example_inputs`` (forward hooks): a pair folds
when the BatchNorm's input *is* the producer's output and nothing else computes with that
output (a second consumer would see the folded values). Without inputs, only adjacent
``producer, BatchNorm`` entries of an ``nn.Sequential`` fold (the order a Sequential runs
is its order). Pairs that cannot fold are listed with the reason.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from prunekit.errors import IncompatibleLayerError, UnsupportedModelError
from prunekit.inputs import Inputs, call
from prunekit.layers import require_model

PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class FoldReport:
    """``folded``: (producer, BatchNorm) names folded; ``skipped``: why others were not."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _Uses(TorchFunctionMode):
    """Counts, per tensor of ``watched`` (id -> producers, filled as they run), the torch
    calls that take it and return a tensor."""

    def __init__(self, watched: dict[int, list[tuple[str, Tensor]]]) -> None:
        super().__init__()
        self.watched, self.uses = watched, Counter[int]()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        if isinstance(out, Tensor | tuple | list):
            for a in (*args, *(kwargs or {}).values()):
                if isinstance(a, Tensor) and id(a) in self.watched:
                    self.uses[id(a)] += 1
        return out


def _traced_pairs(model: nn.Module, inputs: Inputs) -> list[tuple[str, str]]:
    """(producer, BatchNorm) pairs of one pass, each output used by the BatchNorm only."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, list[tuple[str, Tensor]]] = {}
    fed: list[tuple[str, Tensor]] = []

    def out_hook(m: nn.Module, _: object, out: Tensor) -> None:
        produced.setdefault(id(out), []).append((names[m], out))

    def in_hook(m: nn.Module, args: tuple) -> None:
        fed.append((names[m], args[0]))

    hooks = [m.register_forward_hook(out_hook) for m in names if isinstance(m, PRODUCERS)]
    hooks += [m.register_forward_pre_hook(in_hook) for m in names if isinstance(m, _BN)]
    uses = _Uses(produced)
    try:
        with torch.no_grad(), uses:
            outputs = call(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    final = {id(t) for t in _tensors(outputs)}
    calls = Counter(n for n, _ in fed)
    pairs = []
    for bn, x in fed:
        owners = produced.get(id(x), [])
        sole = len(owners) == 1 and owners[0][1] is x and uses.uses[id(x)] == 1
        if sole and id(x) not in final and calls[bn] == 1 and owners[0][0] not in dict(pairs):
            pairs.append((owners[0][0], bn))
    return pairs


def _tensors(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, seq in model.named_modules():
        if isinstance(seq, nn.Sequential):
            items = list(seq.named_children())
            for (a, ma), (b, mb) in itertools.pairwise(items):
                if isinstance(ma, PRODUCERS) and isinstance(mb, _BN):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


def _why_not(producer: nn.Module, bn: nn.Module) -> str:
    out = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False)"
    if bn.num_features != out:
        return f"it has {bn.num_features} features for {out} channels"
    return ""


def _folded(producer: nn.Module, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """The producer's new weight and bias (computed in float64)."""
    w = producer.weight.detach().double()
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    b = producer.bias.detach().double() if producer.bias is not None else torch.zeros_like(mean)
    weight = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    return weight.to(producer.weight.dtype), ((b - mean) * s + beta).to(producer.weight.dtype)


def _check(model: nn.Module) -> None:
    require_model(model, real=True)
    training = [n or type(model).__name__ for n, m in model.named_modules()
                if isinstance(m, _BN) and m.training]  # fmt: skip
    if training:
        raise UnsupportedModelError(
            f"fold_batchnorm: {training[0]!r} is in training mode, where BatchNorm normalises "
            "with batch statistics and cannot be folded; Fix: call model.eval() first (fold "
            "for inference, after training)."
        )
    masked = [n for n, m in model.named_modules()
              if isinstance(m, PRODUCERS) and parametrize.is_parametrized(m)]  # fmt: skip
    if masked:
        raise IncompatibleLayerError(
            f"fold_batchnorm: layer {masked[0]!r} carries a pruning mask; Fix: pk.bake(model) "
            "first, so the folded weights keep their zeros."
        )


def fold_batchnorm(model: nn.Module, example_inputs: Inputs | None = None) -> FoldReport:
    """Fold every BatchNorm into the conv / linear layer before it, in place (see the
    module docstring); the model must be in eval mode. Returns what was folded.

    Raises:
        UnsupportedModelError: a BatchNorm is in training mode (nothing changed).
        IncompatibleLayerError: a producer carries a pruning mask (nothing changed).
    """
    _check(model)
    if example_inputs is None:
        pairs = _sequential_pairs(model)
    else:
        pairs = _traced_pairs(model, example_inputs)
    modules = dict(model.named_modules())
    report, planned = FoldReport(), []
    for p, b in pairs:
        reason = _why_not(modules[p], modules[b])
        if reason:
            report.skipped.append(f"{p} -> {b}: {reason}")
        else:
            planned.append((p, b, *_folded(modules[p], modules[b])))
    for p, b, weight, bias in planned:
        producer = modules[p]
        with torch.no_grad():
            producer.weight.copy_(weight)
        producer.bias = nn.Parameter(bias)
        parent, _, leaf = b.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
        report.folded.append((p, b))
    return report
