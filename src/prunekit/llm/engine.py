"""The layer-by-layer calibration engine (the sequential scheme of SparseGPT and Wanda).

1. **Capture**: a forward pre-hook on the first block records its inputs for every
   calibration batch (hidden states plus whatever else the model passes: attention mask,
   position ids, rotary position embeddings...) and stops the forward there.
2. **Per block**, in order:
   a. forward hooks on its Linear / Conv1D layers accumulate the statistics the method
      needs (:class:`LayerStats`) while the block runs on the captured inputs;
   b. ``visit`` prunes the block's layers from those statistics;
   c. the (now pruned) block runs again; its outputs become the next block's inputs, so
      every block is calibrated on the activations of the pruned-so-far model. During
      this pass each layer's relative reconstruction error
      ``||(W - W') X||_F^2 / ||W X||_F^2`` is measured on its actual inputs ``X``.

Padding: statistics and errors use the real tokens of each batch only (its
``attention_mask``, :class:`RealTokens`). Fused MoE experts (:mod:`prunekit.llm.experts`)
get one set of statistics per expert matrix, from the tokens routed to that expert, keyed
``<experts module>.<gate_up_proj|down_proj>.<expert>`` in the same ``stats`` dict.

Memory: the model, one block's statistics, and one set of calibration hidden states
(``samples x seq_len x hidden``); never all layers' statistics at once. A statistics
pass that precedes pruning keeps none of its outputs (they would be stale); the pass
that computes the block's outputs drops each batch's input as it runs it, so inputs left
and outputs made hold one set together; each layer's statistics go as it is pruned, and
with ``consume`` the captured inputs are the walk's alone. The error meter copies no
weight (:class:`ErrorMeter`) unless the method rewrites weights (SparseGPT, ALPS): then
the dense weights it replaces stay until the block is measured (``measure=False`` frees
them). Repeated block arguments (rotary embeddings) are held once (:func:`_reuse`).
Every hook is removed on exit, error or not.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from prunekit.criteria.activation import ColumnNorms, flat_inputs
from prunekit.criteria.second_order import HessianAccumulator
from prunekit.errors import CalibrationError, PruningError, UnsupportedModelError, first_line
from prunekit.layers import Layer, layer_hooks, to_canonical
from prunekit.llm.blocks import block_layers
from prunekit.llm.calibration import Batch
from prunekit.llm.experts import FusedExperts, expert_hooks, find_experts
from prunekit.llm.memory import release
from prunekit.tables import progress_bar


class _Captured(Exception):
    """Raised by the capture hook to stop the model's forward at the first block."""


@dataclass
class BlockInputs:
    """What each calibration batch feeds a block: hidden states plus the other arguments."""

    hidden: list[Tensor] = field(default_factory=list)
    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[Tensor | None] = field(default_factory=list)
    """Per batch: bool ``(batch, seq_len)``, True on real tokens (the batch's
    ``attention_mask``); None when the batch has no padding."""


class RealTokens:
    """The real-token mask of the batch a block is running, so statistics skip padding.

    :meth:`rows` flattens a layer input ``(..., features)`` to ``(tokens, features)`` rows
    and keeps the real ones, when its leading dimensions hold the batch's
    ``batch x seq_len`` positions in order (every Linear of a decoder block; fused MoE
    experts see the same rows flattened); an input of any other row count is kept whole.
    """

    def __init__(self, tokens: list[Tensor | None]) -> None:
        self.tokens = tokens
        self.current: Tensor | None = None

    def select(self, index: int) -> None:
        """The next forward runs batch ``index``."""
        self.current = self.tokens[index] if index < len(self.tokens) else None

    def rows(self, x: Tensor) -> Tensor:
        """``x`` as ``(rows, features)``: the real tokens' rows of the current batch."""
        flat = x.detach().reshape(-1, x.shape[-1])
        keep = self.current
        if keep is None or flat.shape[0] != keep.numel():
            return flat
        return flat[keep.reshape(-1).to(flat.device)]


def _real(batch: Batch) -> Tensor | None:
    mask = batch.get("attention_mask")
    return None if mask is None or bool((mask != 0).all()) else mask != 0


def _no_cache(value: Any) -> Any:
    # A KV cache passed along would grow on every re-run of a block; blocks need none here.
    return None if "Cache" in type(value).__name__ else value


def capture_inputs(model: nn.Module, first_block: nn.Module, batches: list[Batch]) -> BlockInputs:
    """Run ``model`` on every batch up to ``first_block`` and record the block's inputs."""
    inputs = BlockInputs()

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: _no_cache(v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if args:
            hidden, rest = args[0], tuple(_no_cache(a) for a in args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        inputs.hidden.append(hidden)
        inputs.args.append(_reuse(rest, inputs.args[-1] if inputs.args else None))
        inputs.kwargs.append(_reuse(kwargs, inputs.kwargs[-1] if inputs.kwargs else None))
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            inputs.tokens.append(_real(batch))
            try:
                model(**batch)
            except _Captured:
                continue
            except (TypeError, ValueError, RuntimeError, IndexError) as err:
                if isinstance(err, PruningError):
                    raise
                raise CalibrationError(
                    f"calibration batch {i} ({_shapes(batch)}) does not run through "
                    f"{type(model).__name__} ({type(err).__name__}: {first_line(err)}); Fix: "
                    "pass the tokenizer's output for this model (input_ids and the masks it "
                    "takes, of one shape)."
                ) from err
            raise UnsupportedModelError(
                f"{type(model).__name__}'s forward never called its first block; Fix: pass "
                "blocks='<name of the layer list the forward runs>'."
            )
    finally:
        handle.remove()
    return inputs


def _reuse(value: Any, previous: Any) -> Any:
    """``value`` with every tensor equal to the one in the same place of ``previous`` (the
    last batch's arguments) replaced by that one, so arguments that repeat across batches
    (rotary position embeddings, position ids of same-length windows) are held once."""
    if isinstance(value, Tensor):
        same = (
            isinstance(previous, Tensor)
            and (previous.shape, previous.dtype, previous.device)
            == (value.shape, value.dtype, value.device)
            and bool(torch.equal(previous, value))
        )
        return previous if same else value
    if isinstance(value, tuple) and isinstance(previous, tuple) and len(value) == len(previous):
        items = [_reuse(v, p) for v, p in zip(value, previous, strict=True)]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict) and isinstance(previous, dict):
        return {k: _reuse(v, previous.get(k)) for k, v in value.items()}
    return value


def _shapes(batch: Batch) -> str:
    return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in batch.items())


def run_block(
    block: nn.Module,
    inputs: BlockInputs,
    real: RealTokens | None = None,
    *,
    keep: bool = True,
    consume: bool = False,
) -> list[Tensor] | None:
    """The block's output hidden states for every captured batch (``real`` told which).

    ``keep=False``: run it for its hooks only, each output dropped as soon as it is made
    (returns None), so a statistics pass holds no second set of hidden states.
    ``consume``: each batch's input leaves ``inputs.hidden`` as it is run, so the inputs
    still to run and the outputs made so far together hold one set of hidden states.
    """
    outputs = []
    for index, (args, kwargs) in enumerate(zip(inputs.args, inputs.kwargs, strict=True)):
        hidden = inputs.hidden.pop(0) if consume else inputs.hidden[index]
        if real is not None:
            real.select(index)
        out = block(hidden, *args, **kwargs)
        del hidden
        if keep:
            outputs.append(out[0] if isinstance(out, tuple) else out)
        del out
    return outputs if keep else None


class LayerStats:
    """Statistics of one layer's inputs: column norms (Wanda, OWL) and/or H (SparseGPT)."""

    def __init__(self, width: int, device: torch.device, needs: frozenset[str]) -> None:
        self.norms = ColumnNorms(width, device) if "norms" in needs else None
        self.hessian = HessianAccumulator(width, device) if "hessian" in needs else None

    @classmethod
    def of(cls, layer: Layer, needs: frozenset[str]) -> LayerStats:
        return cls(layer.canonical.shape[1], layer.weight.device, needs)

    def add(self, x: Tensor) -> None:
        for acc in (self.norms, self.hessian):
            if acc is not None:
                acc.add(x)

    @property
    def tokens(self) -> int | None:
        """Tokens seen (None when no statistic is gathered)."""
        acc = self.norms or self.hessian
        return None if acc is None else acc.tokens


class ErrorMeter:
    """Relative output error ``||(W - W') X||^2 / ||W X||^2`` per layer vs a dense snapshot.

    Costs one matmul per layer: the pruned product ``W' X`` is the layer's own output
    (minus its bias), only ``W X`` is recomputed from the snapshot. Expert matrices
    (``experts``: key -> canonical weight) are measured through :meth:`add_rows`.
    """

    def __init__(
        self, layers: list[Layer], real: RealTokens, experts: dict[str, Tensor] | None = None
    ) -> None:
        self.real = real
        # The layers' weights are referenced, not copied: no method writes into a layer's
        # stored tensor (masks are parametrizations; SparseGPT and ALPS give the layer a
        # new tensor, :func:`prunekit.llm.methods.prune_layer`), so it stays the dense
        # weight until measured, at no memory cost for Wanda-like methods. Fused experts
        # are pruned in place (:mod:`prunekit.llm.moe`), so theirs are copied.
        self.dense = {ly.name: to_canonical(ly.module, ly.module.weight.detach()) for ly in layers}
        self.dense |= {k: w.detach().clone() for k, w in (experts or {}).items()}
        self.num = dict.fromkeys(self.dense, 0.0)
        self.den = dict.fromkeys(self.dense, 0.0)

    def add(self, layer: Layer, x: Tensor, out: Tensor) -> None:
        """Accumulate one forward of ``layer`` (input ``x``, output ``out``), real tokens only."""
        pruned = flat_inputs(self.real.rows(out))
        bias = getattr(layer.module, "bias", None)
        if bias is not None:
            pruned = pruned - bias.detach().to(torch.float32)
        self._count(layer.name, flat_inputs(self.real.rows(x)), pruned)

    def add_rows(self, key: str, x: Tensor, weight: Tensor) -> None:
        """Accumulate inputs ``x`` (tokens, in) of expert matrix ``key`` (now ``weight``)."""
        rows = flat_inputs(x)
        self._count(key, rows, rows @ weight.to(torch.float32).T)

    def _count(self, key: str, rows: Tensor, pruned: Tensor) -> None:
        dense = rows @ self.dense[key].to(torch.float32).T
        self.num[key] += float((dense - pruned).square().sum())
        self.den[key] += float(dense.square().sum())

    def relative(self) -> dict[str, float]:
        return {n: self.num[n] / self.den[n] if self.den[n] else 0.0 for n in self.num}


Visit = Callable[[int, list[Layer], dict[str, LayerStats]], bool]


class BlockStream(Protocol):
    """Brings each block's weights in before the walk reaches it and takes them back after
    (out-of-core pruning, :mod:`prunekit.llm.offload`); ``errors`` are the block's own,
    ``inputs`` the next block's (its ``hidden`` may be moved, e.g. to disk)."""

    def load(self, index: int, block: nn.Module) -> None: ...

    def done(
        self, index: int, block: nn.Module, errors: dict[str, float], inputs: BlockInputs
    ) -> None: ...


def _measuring(
    meter: ErrorMeter | None, layers: list[Layer], experts: list[FusedExperts], real: RealTokens
) -> AbstractContextManager[None]:
    """The meter's hooks on the layers and expert matrices (nothing when not measuring)."""
    if meter is None:
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(layer_hooks(layers, meter.add))
    stack.enter_context(expert_hooks(experts, real.rows, lambda k, x, w: meter.add_rows(k, x, w)))
    return stack


def sequential(
    blocks: nn.ModuleList,
    prefix: str,
    inputs: BlockInputs,
    visit: Visit,
    *,
    needs: frozenset[str],
    description: str,
    progress: bool = True,
    measure: bool = True,
    stream: BlockStream | None = None,
    prunes: bool = True,
    consume: bool = False,
) -> dict[str, float]:
    """Walk the blocks in order (module docstring); returns each layer's relative error.

    ``visit(index, layers, stats)`` prunes one block and returns whether it changed
    anything; when it did not, the statistics pass's outputs feed the next block directly
    and no error is measured. ``measure=False`` (a statistics-only pass) skips the dense
    snapshot the error needs. ``inputs`` is left as it was: the walk feeds each block's
    outputs forward in its own copy. ``stream`` loads each block first and takes it back
    once its outputs are computed. ``prunes``: every ``visit`` changes its block, so the
    statistics pass keeps no outputs (False: a statistics-only walk reuses them).
    ``consume``: the walk takes ``inputs.hidden`` over (the caller's list is emptied), so
    the captured hidden states are freed once the first block has run.
    """
    captured = inputs
    inputs = replace(inputs, hidden=list(inputs.hidden))  # only ``hidden`` is rebound below
    if consume:
        captured.hidden.clear()
    real = RealTokens(inputs.tokens)
    errors: dict[str, float] = {}
    walk = _Walk(prefix, inputs, real, needs, measure, prunes)
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(description, total=len(blocks))
        for index, block in enumerate(blocks):
            if stream is not None:
                stream.load(index, block)
            mine = walk.block(index, block, visit)
            errors.update(mine)
            if stream is not None:
                stream.done(index, block, mine, inputs)
            release()
            bar.update(task, advance=1)
    return errors


@dataclass
class _Walk:
    """One step of :func:`sequential`; whatever references a block's tensors (statistics,
    meter, expert views) is local to :meth:`block`, so it is gone when the step returns."""

    prefix: str
    inputs: BlockInputs
    real: RealTokens
    needs: frozenset[str]
    measure: bool
    prunes: bool

    def block(self, index: int, block: nn.Module, visit: Visit) -> dict[str, float]:
        """Statistics, ``visit``, outputs (and errors) of block ``index``; its outputs
        replace ``inputs.hidden``; returns its layers' errors."""
        inputs, real, needs = self.inputs, self.real, self.needs
        layers = block_layers(block, f"{self.prefix}.{index}")
        experts = find_experts(block, f"{self.prefix}.{index}")
        matrices = {k: p[e] for ex in experts for k, p, e in ex.matrices()}
        stats = {ly.name: LayerStats.of(ly, needs) for ly in layers} | {
            k: LayerStats(w.shape[1], w.device, needs) for k, w in matrices.items()
        }
        outputs = None
        if needs:
            collect = lambda ly, x, out: stats[ly.name].add(real.rows(x))  # noqa: E731
            routed = lambda key, x, w: stats[key].add(x)  # noqa: E731
            with layer_hooks(layers, collect), expert_hooks(experts, real.rows, routed):
                outputs = run_block(block, inputs, real, keep=not self.prunes)
        meter = ErrorMeter(layers, real, matrices) if self.measure else None
        del matrices
        mine: dict[str, float] = {}
        changed = visit(index, layers, stats)
        stats.clear()
        if changed or outputs is None:
            with _measuring(meter, layers, experts, real):
                outputs = run_block(block, inputs, real, consume=True)
            mine = meter.relative() if meter else {}
        inputs.hidden = outputs
        return mine
