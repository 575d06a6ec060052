"""Width importance of a causal LM: one score per attention head, KV group, MLP neuron and
embedding channel (higher = more important), from one of three criteria.

``activation`` (Minitron: Muralidharan et al. 2024, "Compact Language Models via Pruning
and Knowledge Distillation", section 2.2), forward passes only. With ``a[b, s, i]`` the
activation of unit ``i`` at token ``s`` of sample ``b``:

- head ``i``: ``a = ||attn_i(X)||_2``, the L2 norm of the head's output (the ``head_dim``
  slice of the input of ``o_proj`` / GPT-2's ``c_proj``);
- neuron ``i``: ``a = |act(X W_1^T)_i|``, the MLP activation (the input of ``down_proj``;
  for gated MLPs ``act(gate) * up``);
- embedding channel ``i``: ``a = |LN(X)_i|``, the normalised hidden state feeding each
  attention and MLP (``input_layernorm`` and the pre-MLP norm), summed over all of them.

Aggregation: the mean over the sequence (real tokens only: padded positions, where
``attention_mask`` is 0, are left out), then the L2 norm over the batch (all calibration
samples): ``F_i = sqrt(sum_b (mean_s a[b, s, i])^2)``, the "(batch L2, sequence mean)"
choice of the paper's comparison of aggregations.

``taylor`` (Molchanov et al. 2019, as :class:`prunekit.criteria.gradient.Taylor`): per
unit ``(sum_{w in unit} w * dL/dw)^2`` with the next-token loss of each calibration batch
(padded positions ignored), averaged over batches.

``magnitude``: the L2 norm of all the weights of a unit (every tensor the unit owns a
slice of: :mod:`prunekit.llm.anatomy`); needs no data.

A KV group's score (GQA) is its own units' score plus the scores of the query heads that
read it (for ``activation`` only the latter: keys and values have no output of their own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunekit.errors import MissingDataError, UnknownChoiceError
from prunekit.inputs import eval_mode
from prunekit.llm.anatomy import Anatomy, Slice, all_slices, describe
from prunekit.llm.calibration import Batch, TokenData, calibration_batches

WIDTH_IMPORTANCE = ("activation", "taylor", "magnitude")


@dataclass(frozen=True)
class WidthScores:
    """Per-unit importance (higher = keep): ``heads (layers, heads)``, ``kv_heads (layers,
    kv_heads)`` (each group's query heads included), ``neurons (layers, intermediate)``,
    ``hidden (hidden,)``."""

    heads: Tensor
    kv_heads: Tensor
    neurons: Tensor
    hidden: Tensor
    method: str


def token_mask(batch: Batch) -> Tensor:
    """``(batch, seq)`` float mask of the real tokens (all ones without ``attention_mask``)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return (torch.ones_like(ids) if mask is None else mask).to(torch.float32)


def sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``values (B, S, units)`` averaged over the real tokens of each sample: ``(B, units)``."""
    weights = mask / mask.sum(1, keepdim=True).clamp(min=1)
    return torch.einsum("bsu,bs->bu", values.float(), weights)


class _Sums:
    """Sum over batches of squared per-sample sequence means (the L2 over the batch)."""

    def __init__(self) -> None:
        self.total: dict[object, Tensor] = {}

    def add(self, key: object, per_sample: Tensor) -> None:
        value = per_sample.square().sum(0).cpu()
        self.total[key] = self.total[key] + value if key in self.total else value

    def l2(self, key: object) -> Tensor:
        return self.total[key].sqrt()


@contextmanager
def _activation_hooks(anatomy: Anatomy, sums: _Sums, current: dict[str, Tensor]) -> Iterator[None]:
    head_dim = anatomy.head_dim
    handles = []

    def pre(key: object, heads: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if heads:
                x = x.unflatten(-1, (-1, head_dim)).norm(dim=-1)
            sums.add(key, sequence_mean(x.abs(), current["mask"]))

        return hook

    def post(key: object) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            sums.add(key, sequence_mean(out.detach().abs(), current["mask"]))

        return hook

    for index, block in enumerate(anatomy.layers):
        handles.append(block.head_input.register_forward_pre_hook(pre(("q", index), True)))
        handles.append(block.neuron_input.register_forward_pre_hook(pre(("n", index), False)))
        for j, norm in enumerate(block.input_norms):
            handles.append(norm.register_forward_hook(post(("h", index, j))))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _activation(anatomy: Anatomy, batches: list[Batch]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    sums, current = _Sums(), {}
    model = anatomy.model
    with _activation_hooks(anatomy, sums, current), torch.no_grad(), eval_mode(model):
        for batch in batches:
            current["mask"] = token_mask(batch).to(batch["input_ids"].device)
            model(**batch, use_cache=False)
    count = range(len(anatomy.layers))
    heads = torch.stack([sums.l2(("q", i)) for i in count])
    neurons = torch.stack([sums.l2(("n", i)) for i in count])
    hidden = sum(sums.l2(k) for k in sums.total if k[0] == "h")
    kv_own = torch.zeros(len(anatomy.layers), anatomy.widths.kv_heads)
    return heads, kv_own, neurons, hidden


def unit_sums(slices: list[Slice], f: Callable[[Slice], Tensor]) -> Tensor:
    """``f(slice)`` (shaped like :meth:`Slice.view`) summed over each unit, over all slices."""
    return sum(f(sl).flatten(1).sum(1) for sl in slices)


def _per_axis(anatomy: Anatomy, f: Callable[[Slice], Tensor]) -> tuple[Tensor, ...]:
    def stack(axis: str) -> Tensor:
        return torch.stack([unit_sums(b.slices[axis], f) for b in anatomy.layers]).cpu().float()

    hidden = unit_sums(list(anatomy.hidden_slices()), f).cpu().float()
    return stack("q"), stack("kv"), stack("neuron"), hidden


def _magnitude(anatomy: Anatomy) -> tuple[Tensor, ...]:
    return tuple(t.sqrt() for t in _per_axis(anatomy, lambda sl: sl.view().float().square()))


def lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean next-token cross-entropy of ``batch`` over its real tokens (padding ignored)."""
    labels = batch["input_ids"].masked_fill(token_mask(batch) == 0, -100)
    return model(**batch, labels=labels, use_cache=False).loss


@contextmanager
def _requiring_grad(params: list[Tensor]) -> Iterator[None]:
    """Gradients for ``params`` even when frozen (``requires_grad`` restored on exit)."""
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


def _taylor(anatomy: Anatomy, batches: list[Batch]) -> tuple[Tensor, ...]:
    model = anatomy.model
    params = list({id(sl.tensor): sl.tensor for _, sl in all_slices(anatomy)}.values())
    totals: list[Tensor] = []
    with eval_mode(model), _requiring_grad(params):
        for batch in batches:
            grads = torch.autograd.grad(lm_loss(model, batch), params, allow_unused=True)
            by_id = {id(p): g for p, g in zip(params, grads, strict=True)}

            def wg(sl: Slice, by_id: dict[int, Tensor | None] = by_id) -> Tensor:
                g = by_id[id(sl.tensor)]
                w = sl.view().float()
                return w * sl.view(g).float() if g is not None else torch.zeros_like(w)

            stats = [t.square() for t in _per_axis(anatomy, wg)]
            totals = [a + b for a, b in zip(totals, stats, strict=True)] if totals else stats
    return tuple(t / len(batches) for t in totals)


def width_importance(
    model: nn.Module,
    data: TokenData | None = None,
    *,
    method: str = "activation",
    batch_size: int = 8,
) -> WidthScores:
    """Per-unit importance of ``model``'s heads, KV groups, neurons and embedding channels
    (module docstring); the model is not changed.

    Raises:
        UnknownChoiceError: ``method`` is not one of :data:`WIDTH_IMPORTANCE`.
        MissingDataError: ``activation`` or ``taylor`` without ``data``.
        IncompatibleLayerError: an unsupported architecture.
        CalibrationError: bad calibration data.
    """
    if method not in WIDTH_IMPORTANCE:
        raise UnknownChoiceError("width importance", method, list(WIDTH_IMPORTANCE))
    anatomy = describe(model)
    if method == "magnitude":
        heads, kv_own, neurons, hidden = _magnitude(anatomy)
    else:
        if data is None:
            raise MissingDataError(
                f"width importance {method!r} needs calibration token ids; Fix: pass data= "
                "(e.g. 128 windows of 256 tokens) or use importance='magnitude'."
            )
        batches = calibration_batches(data, model, batch_size)
        run = _activation if method == "activation" else _taylor
        heads, kv_own, neurons, hidden = run(anatomy, batches)
    group = heads.unflatten(1, (anatomy.widths.kv_heads, -1)).sum(-1)
    return WidthScores(heads, kv_own + group, neurons, hidden, method)
