"""Lottery tickets: iterative magnitude pruning with rewinding (chapter 3.6, corrections.md).

Frankle & Carbin 2019, "The Lottery Ticket Hypothesis": train the dense network from
``theta_0``; prune ``p`` of the weights still alive in every layer (``p / 2`` in the output
layer), by magnitude; reset the survivors to ``theta_0`` and train again; repeat. After
``r`` rounds a layer keeps ``(1 - p) ** r`` of its weights. Frankle et al. 2020, "Linear
Mode Connectivity and the Lottery Ticket Hypothesis", rewind instead to ``theta_k``, the
weights after ``k`` optimizer steps of the first (dense) training, which finds tickets in
deeper networks. Only the weights rewind; the mask persists and only grows.

Each training logs the test accuracy at its early-stopping point (the epoch of best
accuracy on a validation split carved from the training data), as the paper reports. The
random re-initialisation control trains the same masks from freshly drawn weights; a
ticket is "winning" when it beats that control.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from rich.table import Table
from torch import Tensor, nn

from prunekit import coverage
from prunekit.errors import MissingDataError, PruningError, guarded
from prunekit.layers import require_model, select_layers
from prunekit.masks import copy_masks, get_mask
from prunekit.pruner import kept_share
from prunekit.pruning import prune
from prunekit.spec import Constraint, PruneSpec, Settings, between, boolean
from prunekit.tables import TableReport
from prunekit.training import checkpoint
from prunekit.training.configs import COUNT, LR, RATE, RUN
from prunekit.training.data import Source, TrainData, accuracy_on, scorer, source
from prunekit.training.distributed import MaskSync
from prunekit.training.loop import Evaluate, Step, fit

Rewind = Literal["init"] | int
logger = logging.getLogger(__name__)
_ORIGINAL = ".parametrizations.weight.original"


@dataclass(frozen=True)
class RoundResult:
    """One training of the ticket: after ``round`` prunings, ``remaining`` of the weights.

    ``best_epoch`` (1-based) is the early-stopping point (best validation accuracy);
    ``accuracy`` the test accuracy there, ``final_accuracy`` after the last epoch, and
    ``control_accuracy`` the early-stopping test accuracy of the same masks trained from a
    fresh random initialisation (None for the dense round or without the control).
    """

    round: int
    remaining: float
    best_epoch: int
    accuracy: float
    final_accuracy: float
    control_accuracy: float | None


@dataclass(frozen=True)
class LotteryReport(TableReport):
    """What :func:`lottery` found, one :class:`RoundResult` per round; ``model`` is the last
    ticket, trained and masked."""

    rate: float
    rewind: Rewind
    rounds: list[RoundResult]
    model: nn.Module = field(repr=False, compare=False)

    def table(self) -> Table:
        rewind = "theta_0" if self.rewind in ("init", 0) else f"theta_{self.rewind}"
        table = Table(title=f"lottery ticket: IMP, {self.rate:.0%} per round, rewind to {rewind}")
        for col in ("round", "weights left", "best epoch", "acc (early stop)", "acc (final)"):
            table.add_column(col, justify="right")
        table.add_column("random re-init", justify="right")
        for r in self.rounds:
            control = "-" if r.control_accuracy is None else f"{r.control_accuracy:.2%}"
            table.add_row(
                str(r.round),
                f"{r.remaining:.2%}",
                str(r.best_epoch),
                f"{r.accuracy:.2%}",
                f"{r.final_accuracy:.2%}",
                control,
            )
        return table


def _split(
    src: Source, val_fraction: float, seed: int, validate: Evaluate | None
) -> tuple[Source, Evaluate]:
    """The examples trained on and the early-stopping score: ``validate`` as given, or the
    accuracy on ``val_fraction`` of the in-memory training examples (drawn with ``seed``),
    which are then held out of training."""
    if validate is not None:
        return src, scorer(validate, "validate")
    if src.examples is None:
        raise MissingDataError(
            "the lottery picks each training's early-stopping epoch on a validation split, "
            "which batches of your own do not give; Fix: pass validate=, e.g. "
            "validate=lambda model: pk.training.accuracy(model, val_loader)."
        )
    x, y = src.examples
    n = len(x)
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise PruningError(
            f"val_fraction={val_fraction!r} leaves {n_val} of {n} training examples for "
            "validation; Fix: a fraction that keeps both splits non-empty, e.g. 0.1."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, kept = perm[:n_val], perm[n_val:]
    return replace(src, data=(x[kept], y[kept])), partial(accuracy_on, x[val], y[val])


def _plain(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A masked state dict's values under the plain model's keys (masks dropped), cloned."""
    return {
        k.replace(_ORIGINAL, ".weight"): v.detach().clone()
        for k, v in state.items()
        if not k.endswith(".packed")
    }


def _rewind(model: nn.Module, theta: dict[str, Tensor]) -> None:
    """Set every parameter and buffer to ``theta``'s value; the masks stay."""
    state = model.state_dict()
    for key in state:
        if not key.endswith(".packed"):
            state[key] = theta[key.replace(_ORIGINAL, ".weight")]
    model.load_state_dict(state)


@dataclass(frozen=True)
class _Run:
    best_epoch: int
    accuracy: float
    final: float


@dataclass(frozen=True)
class _Trainings:
    """How each training of the search runs: :func:`~prunekit.training.loop.fit` with
    ``settings`` on ``src``'s batches of ``seed`` (the same order every time), data-parallel
    under ``sync``, scored after every epoch by ``validate`` and ``src.evaluate``."""

    src: Source
    validate: Evaluate
    seed: int
    settings: dict[str, Any]
    sync: bool

    def run(self, model: nn.Module, capture: int = -1) -> tuple[_Run, dict[str, Tensor]]:
        """Train ``model``; the run, and the weights after ``capture`` steps (empty unless
        ``capture`` is one of the steps)."""
        val: list[float] = []
        test: list[float] = []
        captured: dict[str, Tensor] = {}

        def score_both() -> None:
            val.append(self.validate(model))
            test.append(self.src.evaluate(model))

        def after_step(step: int) -> None:
            if step == capture:
                captured.update(_plain(model.state_dict()))

        batches = self.src.batches(self.seed)
        fit(model, batches, callback=after_step, on_epoch=score_both, sync=self.sync,
            **self.settings)  # fmt: skip
        best = max(range(len(val)), key=val.__getitem__)
        return _Run(best + 1, test[best], test[-1]), captured


def _control(template: nn.Module, ticket: nn.Module, seed: int) -> nn.Module:
    """``template`` re-initialised from ``seed`` (``reset_parameters``), with ``ticket``'s masks."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fresh = copy.deepcopy(template)  # state: a new network, not a validation dry run
        for module in fresh.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    copy_masks(ticket, fresh)
    return fresh


@dataclass(frozen=True)
class LotteryArgs(Settings):
    """The numbers :func:`lottery` takes, checked at entry: ``rounds`` prunings after the
    dense training (at least one: a ticket is a pruned network), each removing ``rate`` of
    the remaining weights (``output_rate`` in the output layer, which only
    ``include_output=True`` prunes: it is kept dense by default)."""

    label: ClassVar[str] = "lottery"

    rounds: int
    rate: float
    output_rate: float | None
    epochs: int
    lr: float
    batch_size: int
    val_fraction: float
    control: bool
    seed: int

    constraints: ClassVar[Mapping[str, Constraint]] = {
        "rounds": Constraint(COUNT.check, f"{COUNT.text} (the prunings after the dense round)"),
        "rate": RATE,
        "output_rate": between(0.0, 1.0, open_low=True, open_high=True, optional=True),
        "epochs": COUNT,
        "lr": LR,
        "val_fraction": RATE,
        "control": boolean(),
        **RUN,
    }


def _build(model: nn.Module | Callable[[], nn.Module], seed: int) -> nn.Module:
    """``model``, or what the factory ``model`` builds under ``torch.manual_seed(seed)`` (an
    exception it raises is a :class:`~prunekit.errors.UserCallbackError` naming it)."""
    if isinstance(model, nn.Module):
        return model
    if not callable(model):
        raise PruningError(
            f"model={model!r:.80} ({type(model).__name__}) is neither an nn.Module nor a "
            "factory; Fix: pass the dense network, or a function of no arguments building it."
        )
    name = f"model factory {getattr(model, '__qualname__', None) or repr(model)}"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return require_model(guarded(model, name)(), f"the result of the {name}")


def _check(model: nn.Module, rewind: Rewind, steps: int) -> int:
    """The rewind step ``k`` (0 for ``"init"``), or an error for a bad argument."""
    k = 0 if rewind == "init" else rewind
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= steps:
        raise PruningError(
            f"rewind={rewind!r} is neither 'init' nor an optimizer step in 0..{steps} (the "
            "length of one training); Fix: rewind='init' or an early step, e.g. rewind=100."
        )
    masked = [ly.name for ly in select_layers(model) if get_mask(ly.module) is not None]
    if masked:
        raise PruningError(
            f"layers {masked} are already masked, but a lottery ticket is searched from a dense "
            "network; Fix: pass the unpruned model (pk.masks.remove(model))."
        )
    return k


def _rates(
    model: nn.Module, rate: float, output_rate: float | None, ends: Mapping[str, bool]
) -> tuple[dict[str, float], float]:
    """``{layer: rate}`` of the layers the lottery prunes (``ends``: the include flags),
    ``output_rate`` (default ``rate / 2``) in the output layer and ``rate`` in the others;
    and that output rate. An ``output_rate`` for an output layer kept dense is refused."""
    output = coverage.output_layer(model)
    if output_rate is not None and not ends["include_output"]:
        raise PruningError(
            f"output_rate={output_rate!r} is the output layer's rate, but include_output="
            f"False keeps the output layer{f' {output!r}' if output else ''} dense; Fix: pass "
            "include_output=True to prune it at output_rate, or drop output_rate."
        )
    output_rate = rate / 2 if output_rate is None else output_rate
    names = [ly.name for ly in coverage.select(model, **ends)[0]]
    return {n: output_rate if n == output else rate for n in names}, output_rate


def lottery(
    model: nn.Module | Callable[[], nn.Module],
    data: TrainData,
    *,
    rounds: int = 5,
    rate: float = 0.2,
    output_rate: float | None = None,
    include_output: bool = False,
    include_embeddings: bool = False,
    rewind: Rewind = "init",
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    optimizer: str = "adam",
    val_fraction: float = 0.1,
    control: bool = True,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    distributed: bool | None = None,
    step: Step | None = None,
    evaluate: Evaluate | None = None,
    validate: Evaluate | None = None,
) -> LotteryReport:
    """Search a lottery ticket by iterative magnitude pruning (Frankle & Carbin 2019).

    Round 0 trains the dense network; each of the ``rounds`` further rounds prunes
    ``rate`` of the remaining weights of every prunable layer but the output layer and the
    embeddings (``include_output=True`` prunes the output layer at ``output_rate``, default
    ``rate / 2``, as Frankle & Carbin do; see :mod:`prunekit.coverage`) by magnitude
    (:func:`prunekit.prune`, local scope),
    rewinds the survivors to ``theta_k`` and trains ``epochs`` epochs with a fresh
    optimizer, so after ``r`` rounds a layer keeps ``(1 - rate) ** r``.

    Args:
        model: the dense network (trained in place), or a zero-argument factory called
            under ``torch.manual_seed(seed)``.
        data: a dataset in memory (:func:`prunekit.zoo.load_dataset`): ``val_fraction``
            of its training split (drawn with ``seed``) is held out to pick the
            early-stopping epoch, and its test split scores each epoch. Or any
            re-iterable of batches (:mod:`~prunekit.training.data`) with ``evaluate``
            and ``validate``.
        rewind: ``"init"`` (``theta_0``, Frankle & Carbin 2019) or ``k``, an optimizer step
            of the dense training (``theta_k``, Frankle et al. 2020); ``0`` is ``"init"``.
        epochs / lr / batch_size / optimizer / step: each training, via
            :func:`~prunekit.training.loop.fit` (in-memory batches of ``batch_size``
            drawn from ``seed``, the same order every round).
        control: also train every round's masks from a fresh random initialisation.
        include_output / include_embeddings: also prune the output layer (at
            ``output_rate``) / the embeddings, kept dense by default.
        checkpoint_dir: write an atomic checkpoint there after every round; started again
            with the same arguments, the run resumes from the last one and ends with
            exactly the masks and weights of an uninterrupted run.
        distributed: under ``torch.distributed`` (every rank calling ``lottery`` alike,
            e.g. launched with torchrun), train data-parallel: each rank takes its share
            of every batch through DDP, rank 0's masks are broadcast after every prune,
            only rank 0 writes checkpoints and shows progress, and every rank resumes
            from rank 0's checkpoint. ``None`` (default): when a process group is
            initialised; ``True``: required (:class:`~prunekit.errors.DistributedError`
            without one); ``False``: never.
        evaluate / validate: ``score(model) -> float``: the reported score (default: test
            accuracy) and the early-stopping one (default: accuracy on the held-out
            ``val_fraction``; given, nothing is held out).

    Returns:
        A :class:`LotteryReport` with weights remaining and accuracies per round.

    Raises:
        PruningError: bad arguments or an already-masked model;
            :class:`~prunekit.errors.CheckpointError` for a corrupted checkpoint or one of
            another model or run (nothing is modified).
    """
    LotteryArgs(rounds, rate, output_rate, epochs, lr, batch_size, val_fraction, control, seed)
    hook = MaskSync.resolve(distributed)
    model = _build(model, seed)
    ends = dict(include_output=include_output, include_embeddings=include_embeddings)
    rates, output_rate = _rates(model, rate, output_rate, ends)
    src, validate = _split(source(data, batch_size, evaluate), val_fraction, seed, validate)
    settings = dict(epochs=epochs, lr=lr, optimizer=optimizer, step=step, progress=progress)
    trainings = _Trainings(src, validate, seed, settings, hook is not None)
    k = _check(model, rewind, epochs * src.steps_per_epoch)
    src.check(trainings.sync)
    names = list(rates)
    spec = PruneSpec(scope="local", layers=names, **ends)  # magnitude; each round its allocation
    config = dict(settings, batch_size=batch_size, seed=seed, rounds=rounds, rate=rate)
    config.update(output_rate=output_rate, rewind=k, val_fraction=val_fraction, control=control,
                  **ends)  # fmt: skip
    del config["progress"]
    identity = checkpoint.identity("lottery", model, data, config)
    template = copy.deepcopy(model)  # state: theta_0's architecture, re-initialised per control
    saved = checkpoint.resume(checkpoint_dir, identity, model, sync=trainings.sync)
    if saved is None:
        start, history, theta = 0, [], _plain(model.state_dict())
    else:
        start, theta = saved.round + 1, saved.extra
        history = [RoundResult(**r) for r in saved.state["history"]]
    for r in range(start, rounds + 1):
        if r > 0:
            allocation = {n: 1 - (1 - p) ** r for n, p in rates.items()}
            prune(model, spec=spec.replace(allocation=allocation))
            if hook is not None:
                hook(model)
            _rewind(model, theta)
        run, captured = trainings.run(model, k if r == 0 else -1)
        theta = captured or theta
        control_acc = None
        if control and r > 0:
            control_acc = trainings.run(_control(template, model, seed + r))[0].accuracy
        layers = [(ly.module, ly.weight.numel()) for ly in select_layers(model, names)]
        history.append(
            RoundResult(r, kept_share(layers), run.best_epoch, run.accuracy, run.final, control_acc)
        )
        logger.info("lottery round %d of %d: %.2f%% of the weights left, accuracy %.4f", r,
                    rounds, 100 * history[-1].remaining, run.accuracy)  # fmt: skip
        if checkpoint_dir is not None:
            state = {"rewind": k, "history": [vars(h) for h in history]}
            checkpoint.save_round(checkpoint_dir, r, model, identity, state, theta,
                                  sync=trainings.sync)  # fmt: skip
    return LotteryReport(rate, rewind, history, model)
