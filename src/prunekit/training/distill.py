"""Knowledge distillation: train a (pruned) student to match a frozen teacher's outputs,
through the one training loop, :func:`~prunekit.training.loop.fit`.

The loss of a batch, per token ``i`` of ``N`` (Hinton et al. 2015, "Distilling the
Knowledge in a Neural Network"; Minitron, Muralidharan et al. 2024 and Sreenivas et al.
2024, recover pruned LLMs with the forward KL on logits alone, ``alpha = 1``)::

    L = alpha * T^2 * (1/N) sum_i KL(softmax(z_t,i / T) || softmax(z_s,i / T))
      + (1 - alpha) * task(student, batch)          # default: next-token cross-entropy
      + hidden * (1/N) sum_i ||h_s,i - h_t,i||^2 / d # the last hidden states (optional)

``z_t``, ``z_s``: teacher and student logits; ``T``: the temperature (``T^2`` keeps the
gradient's scale independent of ``T``); ``h``: the last hidden states, of width ``d``
(equal widths only: a student pruned in hidden size has none to compare). The teacher
runs in eval mode without gradients; the student trains with a fresh Adam (or SGD).

A batch is a ``(B, T)`` tensor of token ids or a mapping of model keyword arguments with
``input_ids`` (``attention_mask`` then masks the padding out of every term; ``labels`` is
dropped: the task loss comes from the ids). ``data`` is re-iterated as often as
``steps`` needs, in its own order.

    report = pk.training.distill(student, teacher, batches, steps=200, lr=1e-3)
    pk.training.distill(student, teacher, batches, steps=200, checkpoint_dir="ckpt/")
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import CheckpointError, PruningError
from prunekit.inputs import eval_mode
from prunekit.spec import Constraint, Settings, between, integer, one_of
from prunekit.training import checkpoint
from prunekit.training.checkpoint_fields import FIX
from prunekit.training.distributed import resolve
from prunekit.training.loop import Step, fit, training_step


def _optional_steps(value: Any) -> int | None:
    return None if value is None else integer(1).check(value)


@dataclass(frozen=True)
class Distillation(Settings):
    """How :func:`distill` trains (see the module docstring for the loss).

    Attributes:
        steps: optimizer steps (batches drawn from the data, cycled as needed).
        lr / optimizer / weight_decay: the student's optimizer (``adam`` or ``sgd``).
        temperature: ``T`` of the softened distributions (> 0).
        alpha: the weight of the KL term; ``1 - alpha`` weighs the task loss.
        hidden: the weight of the last-hidden-state mean squared error (0: off).
        every: with a ``checkpoint_dir``, save one every ``every`` steps (default: every
            ``steps // 10``, at least 1). Each such chunk trains with a fresh optimizer
            (:func:`~prunekit.training.loop.fit` builds its own), so that a resumed run
            ends exactly where an uninterrupted one does.
    """

    steps: int = 100
    lr: float = 1e-3
    temperature: float = 1.0
    alpha: float = 1.0
    hidden: float = 0.0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    every: int | None = None

    constraints: ClassVar[Mapping[str, Constraint]] = {
        "steps": integer(1),
        "lr": between(0.0, open_low=True),
        "temperature": between(0.0, open_low=True),
        "alpha": between(0.0, 1.0),
        "hidden": between(0.0),
        "optimizer": one_of("optimizer", "adam", "sgd"),
        "weight_decay": between(0.0),
        "every": Constraint(_optional_steps, "None or an int >= 1"),
    }

    def chunk(self, checkpointing: bool) -> int:
        """Steps per :func:`~prunekit.training.loop.fit` call (one checkpoint each)."""
        if not checkpointing:
            return self.steps
        return self.every if self.every is not None else max(1, self.steps // 10)




@dataclass(frozen=True)
class DistillReport:
    """What :func:`distill` did: ``losses``, the mean training loss of each chunk of
    steps (one chunk unless checkpointing), ``steps``, ``tokens`` trained on (this
    process's count, resumed chunks excluded) and ``seconds``."""

    settings: Distillation
    losses: list[float]
    steps: int
    tokens: int
    seconds: float

    def __str__(self) -> str:
        last = f"{self.losses[-1]:.4f}" if self.losses else "n/a"
        return (
            f"distilled {self.steps} steps ({self.tokens:,} tokens) in {self.seconds:.1f}s, "
            f"final loss {last} (T={self.settings.temperature:g}, "
            f"alpha={self.settings.alpha:g}, hidden={self.settings.hidden:g})"
        )


def model_inputs(batch: Any) -> dict[str, Tensor]:
    """A batch (ids, or a mapping with ``input_ids``) as the model's keyword arguments."""
    if isinstance(batch, Tensor):
        return {"input_ids": batch}
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
        return {k: v for k, v in batch.items() if k != "labels"}
    raise PruningError(
        f"a distillation batch of type {type(batch).__name__} is neither a (B, T) tensor of "
        "token ids nor a mapping with 'input_ids'; Fix: yield ids or {'input_ids': ids, ...}."
    )


def _forward(model: nn.Module, inputs: dict[str, Tensor], hidden: bool) -> tuple[Tensor, Any]:
    device = next(model.parameters()).device
    moved = {k: v.to(device) for k, v in inputs.items()}
    out = model(**moved, output_hidden_states=True) if hidden else model(**moved)
    logits = out if isinstance(out, Tensor) else out.logits
    return logits, (out.hidden_states[-1] if hidden else None)


def kl_per_token(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` of each position: ``(B, T)``."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.device, values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def next_token_loss(logits: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
    """Cross-entropy of each position's prediction of the next id (padding masked)."""
    ids = inputs["input_ids"].to(logits.device)
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
    )
    mask = inputs.get("attention_mask")
    return _masked_mean(loss, None if mask is None else mask[:, 1:].flatten())


@dataclass(frozen=True)
class DistillStep:
    """The training step of :func:`distill` (``step(student, batch) -> loss``, the protocol
    of :func:`~prunekit.training.loop.fit`): the loss of the module docstring. ``task``:
    the student's own loss for the ``1 - alpha`` term (default :func:`next_token_loss`)."""

    teacher: nn.Module
    settings: Distillation
    task: Step | None = None

    def __call__(self, student: nn.Module, batch: Any) -> Tensor:
        s, inputs = self.settings, model_inputs(batch)
        logits, h_s = _forward(student, inputs, s.hidden > 0)
        with torch.no_grad():
            t_logits, h_t = _forward(self.teacher, inputs, s.hidden > 0)
        mask = inputs.get("attention_mask")
        loss = logits.new_zeros((), dtype=torch.float32)
        if s.alpha > 0:
            kl = kl_per_token(logits, t_logits.to(logits.device), s.temperature)
            loss = loss + s.alpha * s.temperature**2 * _masked_mean(kl, mask)
        if s.alpha < 1:
            task = (
                next_token_loss(logits, inputs) if self.task is None else self.task(student, batch)
            )
            loss = loss + (1 - s.alpha) * task
        if s.hidden > 0:
            mse = (h_s.float() - h_t.to(h_s.device).float()).pow(2).mean(-1)
            loss = loss + s.hidden * _masked_mean(mse, mask)
        return loss


def kl_divergence(
    student: nn.Module, teacher: nn.Module, batches: Iterable[Any], temperature: float = 1.0
) -> float:
    """Mean per-token ``KL(teacher || student)`` over ``batches`` (eval mode, no gradients,
    padding masked): how far the student still is from the teacher."""
    total, count = 0.0, 0.0
    with eval_mode(student), eval_mode(teacher), torch.no_grad():
        for batch in batches:
            inputs = model_inputs(batch)
            logits, _ = _forward(student, inputs, False)
            t_logits, _ = _forward(teacher, inputs, False)
            kl = kl_per_token(logits, t_logits.to(logits.device), temperature)
            mask = inputs.get("attention_mask")
            weight = torch.ones_like(kl) if mask is None else mask.to(kl.device, kl.dtype)
            total, count = total + float((kl * weight).sum()), count + float(weight.sum())
    return total / max(count, 1.0)


class Steps:
    """Batches ``start, ..., stop - 1`` of ``data`` iterated over and over (a re-iterable
    of ``stop - start`` batches, the same ones on every iteration); ``tokens`` counts the
    ids it has yielded."""

    def __init__(self, data: Iterable[Any], start: int, stop: int) -> None:
        self.data, self.start, self.stop, self.tokens = data, start, stop, 0

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[Any]:
        index = 0
        while index < self.stop:
            before = index
            for batch in self.data:
                if index >= self.start:
                    self.tokens += model_inputs(batch)["input_ids"].numel()
                    yield batch
                index += 1
                if index >= self.stop:
                    return
            if index == before:
                raise PruningError(
                    f"the distillation data ({type(self.data).__name__}) yielded no batch; "
                    "Fix: give at least one batch."
                )


def _width(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "hidden_size", None)


def _check_models(student: Any, teacher: Any, settings: Distillation) -> None:
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
            raise PruningError(
                f"{name}={model!r} is not an nn.Module with parameters; Fix: pass the model."
            )
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise PruningError(
            f"the student and the teacher share {len(shared)} parameter tensor(s), so training "
            "the student would move the teacher; Fix: pass a copy, e.g. copy.deepcopy(teacher)."
        )
    vocab = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (student, teacher)]
    if None not in vocab and vocab[0] != vocab[1]:
        raise PruningError(
            f"student vocab_size {vocab[0]} != teacher vocab_size {vocab[1]}: logits do not "
            "compare; Fix: distill between models of one tokenizer."
        )
    widths = (_width(student), _width(teacher))
    if settings.hidden > 0 and (None in widths or widths[0] != widths[1]):
        raise PruningError(
            f"hidden={settings.hidden:g} compares last hidden states, but their widths are "
            f"{widths[0]} (student) and {widths[1]} (teacher); Fix: hidden=0 (logits only)."
        )


def _check_data(data: Any) -> None:
    if isinstance(data, Tensor | Iterator) or not isinstance(data, Iterable):
        raise PruningError(
            f"distillation data of type {type(data).__name__} is not a re-iterable of batches "
            "(it is cycled for the steps); Fix: a list of id tensors or a DataLoader."
        )


def _resumed_losses(directory: Any, identity: dict[str, Any], sync: bool) -> list[float] | None:
    """The per-chunk losses of the checkpoint in ``directory`` (None: none yet), checked
    before :func:`~prunekit.training.checkpoint.resume` touches the student."""
    saved = None if directory is None else checkpoint.load(directory, identity, sync=sync)
    if saved is None:
        return None
    losses = saved.state.get("losses")
    ok = isinstance(losses, list) and len(losses) == saved.round
    ok = ok and set(saved.state) == {"losses", "rng"}  # load adds the RNG states
    if not ok or not all(type(v) in (int, float) and math.isfinite(v) for v in losses):
        raise CheckpointError(
            f"checkpoint {directory}: state {saved.state!r:.80} is not {{'losses': "
            f"[{saved.round} finite numbers]}}; nothing was changed. {FIX}"
        )
    return [float(v) for v in losses]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    settings: Distillation | None = None,
    *,
    task: Step | None = None,
    checkpoint_dir: str | None = None,
    distributed: bool | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> DistillReport:
    """Train ``student`` in place to match ``teacher`` on ``data`` (module docstring).

    Args:
        student / teacher: models returning logits (a tensor or ``.logits``) over one
            vocabulary; the teacher is only read (eval mode, no gradients).
        data: a re-iterable of batches (ids or mappings with ``input_ids``), cycled.
        settings / options: a :class:`Distillation`, and/or its fields as keywords
            (``steps=200, lr=1e-3, temperature=2.0, alpha=0.5, hidden=0.1``).
        task: ``task(student, batch) -> loss`` for the ``1 - alpha`` term.
        checkpoint_dir: save an atomic checkpoint every ``every`` steps; the same call
            resumes from the last one and ends as an uninterrupted run would.
        distributed: under ``torch.distributed`` (torchrun), train data-parallel through
            :func:`~prunekit.training.loop.fit` (``None``: when a group exists).
        log: ``log(line)`` after every chunk of steps (e.g. ``print``).

    Raises:
        PruningError: bad settings, models or data, before anything changes;
            :class:`~prunekit.errors.CheckpointError` for a checkpoint of another run.
    """
    cfg = Distillation.merged(settings, options, what="distillation", argument="settings",
                              public="pk.training.Distillation")
    _check_models(student, teacher, cfg)
    _check_data(data)
    training_step(task, None)  # a task that is not callable fails here, not mid-run
    sync = resolve(distributed)
    chunk = cfg.chunk(checkpoint_dir is not None)
    rounds = math.ceil(cfg.steps / chunk)
    shapes = {k: list(v.shape) for k, v in teacher.state_dict().items()}
    config = {**dataclasses.asdict(cfg), "rounds": rounds, "task": task, "teacher": shapes}
    identity = checkpoint.identity("distill", student, data, config)
    losses = _resumed_losses(checkpoint_dir, identity, sync) or []
    if losses:
        checkpoint.resume(checkpoint_dir, identity, student, sync=sync)
    step, tokens, start = DistillStep(teacher, cfg, task), 0, time.perf_counter()
    with eval_mode(teacher):
        for r in range(len(losses), rounds):
            batches = Steps(data, r * chunk, min((r + 1) * chunk, cfg.steps))
            optim = dict(lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay)
            losses += fit(student, batches, step=step, progress=progress, sync=sync, **optim)
            tokens += batches.tokens
            if checkpoint_dir is not None:
                state = {"losses": losses}
                checkpoint.save_round(checkpoint_dir, r + 1, student, identity, state, sync=sync)
            if log is not None:
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                done = f"{batches.stop}/{cfg.steps}"
                log(f"distill step {done} loss {losses[-1]:.4f} ({rate:,.0f} tokens/s)")
    return DistillReport(cfg, losses, cfg.steps, tokens, time.perf_counter() - start)
