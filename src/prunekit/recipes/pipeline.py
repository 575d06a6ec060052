"""Run a checked ``kind: prune`` recipe: build, dry-run, train / prune by its timing,
materialise, profile and export, returning the report's sections.

Timing and method (``timing.when`` / ``timing.method``) pick the pipeline:

==========  ===========  ==================================================================
after       finetune     train ``train.epochs`` dense, then prune on ``schedule`` while
                         fine-tuning ``finetune.epochs`` (one-shot: prune, then fine-tune)
during      gradual      :class:`prunekit.Pruner` on ``schedule`` while training from scratch
                         (Zhu & Gupta 2017 with ``cubic``)
during      soft-filter  :func:`prunekit.training.soft_filter_pruning` (He et al. 2018)
during      slimming     :func:`prunekit.training.network_slimming` (Liu et al. 2017)
before      at-init      prune at initialisation (SNIP, GraSP, SynFlow, ...; ``iterative``
                         SynFlow in ``schedule.rounds`` rounds), then train
before      lottery      :func:`prunekit.training.lottery` (Frankle & Carbin 2019), rounds
                         ``schedule.rounds`` (1 for one-shot) removing ``1 - (1 - s)^(1/rounds)``
                         each, so the ticket ends near ``prune.sparsity``
==========  ===========  ==================================================================

Each pipeline reads the method's typed settings (``recipe.config``, one class of
:mod:`prunekit.training.configs` per method) and turns them into the keyword arguments of
the training functions. Schedules are written in fractions of their training phase
(``start: 0.0, end: 0.8``) and turned into optimizer steps here, so ``--quick`` (fewer
epochs, less data) keeps them valid. Before any training, :func:`dry_run` plans the
pruning and materialisation on the untrained model (:mod:`prunekit.recipes.plans`: no
copy of the model, nothing run on it), so every model-specific error (a layer the
granularity cannot split, a model without BatchNorm to slim, ...) is raised first, at the
recipe line it comes from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from torch import nn

import prunekit as pk
from prunekit import cli_model, model_spec, training, zoo
from prunekit.analysis import plots
from prunekit.analysis.report import Section
from prunekit.cli_model import Data, Loaders, evaluator
from prunekit.errors import PruningError
from prunekit.export import export
from prunekit.inputs import Inputs
from prunekit.recipes import plans
from prunekit.recipes.validate import Recipe
from prunekit.schedules import Cubic, Iterative, OneShot, Schedule, geometric
from prunekit.training.configs import AtInit, Lottery, Method, Scheduled, Slimming, SoftFilter
from prunekit.zoo.train import steps_per_epoch

QUICK_TRAIN, QUICK_TEST = 256, 128


@dataclass
class Run:
    """Everything one recipe run works with, and the accuracy after each stage."""

    recipe: Recipe
    model: nn.Module
    data: Data | None
    example: Inputs
    calibration: list | None
    quick: bool
    console: Console
    stages: dict[str, float] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)

    @property
    def config(self) -> Method:
        """The timing method's settings."""
        assert self.recipe.config is not None
        return self.recipe.config

    def epochs(self, section: str) -> int:
        """``section``'s ``epochs`` (``train`` or ``finetune``); at most 1 under ``--quick``."""
        epochs = getattr(self.config, "epochs" if section == "train" else "finetune_epochs")
        return min(epochs, 1) if self.quick else epochs

    def measure(self, stage: str) -> None:
        """Record the test accuracy after ``stage`` (nothing without data)."""
        if self.data is not None:
            self.stages[stage] = evaluator(self.data)(self.model)


def _scores(data: Data | None, validate: bool = False) -> dict[str, object]:
    """``evaluate`` (and ``validate``, early stopping) for a pipeline on the user's loaders:
    accuracy on their eval loader; none for a zoo dataset (its test split is the default)."""
    if not isinstance(data, Loaders):
        return {}
    score = evaluator(data)
    return {"evaluate": score, "validate": score} if validate else {"evaluate": score}


def _data(recipe: Recipe, quick: bool) -> Data | None:
    """The recipe's data: the loaders its data function returned when the recipe was read
    (used as they are, also under ``--quick``), or a zoo dataset (``--quick``: trimmed)."""
    d = recipe["data"]
    if recipe.loaders is not None or d["dataset"] is None:
        return recipe.loaders
    data = zoo.load_dataset(d["dataset"], flat=d["flat"])
    if not quick:
        return data
    return dataclasses.replace(
        data,
        x_train=data.x_train[:QUICK_TRAIN],
        y_train=data.y_train[:QUICK_TRAIN],
        x_test=data.x_test[:QUICK_TEST],
        y_test=data.y_test[:QUICK_TEST],
    )


def prepare(recipe: Recipe, quick: bool, console: Console) -> Run:
    """Load the data and the model; model errors point at the ``model`` lines."""
    m = recipe["model"]
    data = _data(recipe, quick)
    try:
        loaded = model_spec.load_model(m["spec"], kwargs=m["kwargs"], checkpoint=m["checkpoint"])
        device = model_spec.device(recipe["device"])  # checked when the recipe was read
        loaded.model.to(device)
        example = cli_model.to_device(cli_model.example_input(loaded, data), device)
        if isinstance(data, zoo.Dataset):
            model_spec.check_fits(loaded.model, m["spec"], data)
        else:
            cli_model.check_example(loaded, example)
    except PruningError as err:
        raise recipe.fail(("model",), m["spec"], f"does not load: {err}", "fix the model.") from err
    d, seed = recipe["data"], recipe["seed"]
    batches = (
        cli_model.calibration(data, device, d["calibration_batches"], d["batch_size"], seed)
        if data is not None
        else None
    )
    return Run(recipe, loaded.model, data, example, batches, quick, console)


def _calibration(run: Run) -> list | None:
    """The batches the criterion scores on (SynFlow: the example input's shape)."""
    spec = plans.spec(run.recipe)
    return [run.example] if spec is not None and spec.crit.name == "synflow" else run.calibration


def _uses_pruner(cfg: Method) -> bool:
    """Whether the method prunes through a :class:`~prunekit.Pruner` on its schedule."""
    return isinstance(cfg, Scheduled) and (cfg.when == "during" or cfg.schedule != "one-shot")


def _schedule(run: Run, phase_epochs: int) -> Schedule:
    """The recipe's schedule in optimizer steps of a ``phase_epochs`` training phase."""
    cfg = run.config
    assert isinstance(cfg, Scheduled)
    per_epoch = steps_per_epoch(cli_model.train_data(run.data), run.recipe["data"]["batch_size"])
    total = phase_epochs * per_epoch
    start = round(cfg.start * total)
    if cfg.schedule == "one-shot":
        return OneShot(at=max(1, start))
    span = max(1, round(cfg.end * total) - start)
    rounds = min(cfg.rounds, span)  # at most one cut per optimizer step
    every = span // rounds
    if cfg.schedule == "iterative":
        return Iterative(steps=rounds, every=every, start=start, spacing=cfg.spacing)
    return Cubic(start=start, end=start + every * rounds, every=every, initial=cfg.initial)


def _train(run: Run, section: str, pruner: pk.Pruner | None = None) -> None:
    cfg = run.config
    epochs = run.epochs(section)
    lr = cfg.lr if section == "train" else getattr(cfg, "finetune_lr", cfg.lr)
    common = dict(batch_size=run.recipe["data"]["batch_size"], optimizer=cfg.optimizer)
    seed = run.recipe["seed"] + (section == "finetune")
    data = cli_model.train_data(run.data)
    if pruner is not None:
        training.train_with_pruner(run.model, data, pruner, epochs, lr, seed=seed, **common)
    elif epochs:
        zoo.train(run.model, data, epochs=epochs, lr=lr, seed=seed, **common)


def _phase(run: Run) -> str:
    """The training phase a schedule spreads over: fine-tuning after training, else training."""
    return "finetune" if run.config.when == "after" else "train"


def _pruner(run: Run) -> pk.Pruner:
    schedule = _schedule(run, run.epochs(_phase(run)))
    spec, data = plans.spec(run.recipe), _calibration(run)
    return pk.Pruner(run.model, run.config.sparsity or 0.0, schedule=schedule, spec=spec, data=data)


def _one_shot(run: Run) -> None:
    spec, data = plans.spec(run.recipe), _calibration(run)
    run.console.print(pk.prune(run.model, run.config.sparsity, spec=spec, data=data))


def _finetune(run: Run) -> None:
    _train(run, "train")
    run.measure("dense")
    if not _uses_pruner(run.config):
        _one_shot(run)
        run.measure("pruned")
        _train(run, "finetune")
    else:
        _train(run, "finetune", _pruner(run))
    run.measure("fine-tuned")


def _gradual(run: Run) -> None:
    run.measure("untrained")
    _train(run, "train", _pruner(run))
    run.measure("trained while pruning")
    if run.epochs("finetune"):
        _train(run, "finetune")
        run.measure("fine-tuned")


def _structural(run: Run) -> None:
    cfg, r = run.recipe.config, run.recipe
    common = dict(
        ratio=cfg.sparsity,
        epochs=run.epochs("train"),
        lr=cfg.lr,
        batch_size=r["data"]["batch_size"],
        optimizer=cfg.optimizer,
        seed=r["seed"],
        progress=True,
        **_scores(run.data),
    )
    data = cli_model.train_data(run.data)
    if isinstance(cfg, SoftFilter):
        report = training.soft_filter_pruning(
            run.model, data, run.example, criterion=cfg.criterion, **common
        )
    else:
        assert isinstance(cfg, Slimming)
        report = training.network_slimming(
            run.model,
            data,
            run.example,
            sparsity_lambda=cfg.sparsity_lambda,
            finetune_epochs=run.epochs("finetune"),
            **common,
        )
    run.console.print(report)
    run.stages |= {"pruned (shrunk)": report.pruned_accuracy, "final": report.final_accuracy}


def _at_init(run: Run) -> None:
    cfg = run.config
    assert isinstance(cfg, AtInit)
    if cfg.schedule == "iterative":
        report = training.synflow_prune(
            run.model,
            cfg.sparsity,
            run.example,
            rounds=min(cfg.rounds, 5) if run.quick else cfg.rounds,
            granularity=cfg.spec.granularity,
            layers=cfg.spec.layers,
            exclude=cfg.spec.exclude,
            include_output=cfg.spec.include_output,
            include_embeddings=cfg.spec.include_embeddings,
        )
        run.console.print(report)
    else:
        _one_shot(run)
    run.measure("pruned at init")
    _train(run, "train")
    run.measure("trained")


def _lottery(run: Run) -> None:
    cfg = run.config
    assert isinstance(cfg, Lottery)
    rounds = 1 if cfg.schedule == "one-shot" else cfg.rounds
    rounds = min(rounds, 2) if run.quick else rounds
    report = training.lottery(
        run.model,
        cli_model.train_data(run.data),
        rounds=rounds,
        rate=geometric(cfg.sparsity, 1 / rounds),
        rewind=cfg.rewind,
        epochs=run.epochs("train"),
        lr=cfg.lr,
        batch_size=run.recipe["data"]["batch_size"],
        optimizer=cfg.optimizer,
        control=cfg.control,
        include_output=cfg.include_output,
        include_embeddings=cfg.include_embeddings,
        seed=run.recipe["seed"],
        progress=True,
        **_scores(run.data, validate=True),
    )
    run.console.print(report)
    run.model = report.model
    run.sections.append(
        Section(
            "Lottery rounds",
            "One row per round of iterative magnitude pruning.",
            [vars(row) for row in report.rounds],
        )
    )
    run.stages |= {f"round {row.round}": row.final_accuracy for row in report.rounds}


PIPELINES = {
    "finetune": _finetune,
    "gradual": _gradual,
    "soft-filter": _structural,
    "slimming": _structural,
    "at-init": _at_init,
    "lottery": _lottery,
}


def materialize(run: Run) -> None:
    """Turn the masks into what ``materialize.mode`` asks: masks, baked, shrunk or sparse."""
    m = run.recipe["materialize"]
    if m["mode"] == "bake":
        pk.bake(run.model)
    elif m["mode"] == "shrink":
        run.console.print(pk.shrink(run.model, run.example, ratio=None))
    elif m["mode"] == "sparse":
        run.console.print(pk.sparse.convert(run.model, m["format"]))


def dry_run(run: Run) -> None:
    """Plan the pruning and materialisation on the untrained model as the recipe will run
    them (:func:`prunekit.recipes.plans.dry_run`; a schedule by building its Pruner, which
    plans too), so that any error is raised before training at its recipe line."""
    r = run.recipe
    plans.dry_run(r, run.model, run.example, _calibration(run))
    if _uses_pruner(run.config) and run.data is not None:  # steps are counted in the data
        try:
            _pruner(run)
        except PruningError as err:
            problem = f"fails on the model: {err}"
            raise r.fail(("prune",), r["prune"], problem, plans.PRUNE_FIX) from err


def execute(run: Run, folder: Path) -> None:
    """Run the pipeline, materialise, profile and export; fill ``run.sections``."""
    r = run.recipe
    dense = pk.analysis.profile(run.model, run.example, latency=False)
    PIPELINES[r["timing"]["method"]](run)
    density = plots.plot_layer_density(run.model)  # before sparse modules replace the layers
    mode = r["materialize"]["mode"]
    if mode == "sparse":  # export the masked model, before its layers become sparse modules
        exported = _export(run, folder)
    materialize(run)
    if mode not in ("masks", "bake"):
        run.measure(f"materialized ({mode})")
    if mode != "sparse":
        exported = _export(run, folder)
    after = pk.analysis.profile(run.model, run.example, min_run_time=0.05 if run.quick else 0.2)
    run.console.print(after)
    ratios = pk.analysis.compare(dense, after)
    run.sections += [
        Section(
            "Accuracy",
            "Test accuracy after each stage; the density of each layer after pruning.",
            [{"stage": k, "accuracy": v} for k, v in run.stages.items()] or None,
            {"density": density},
        ),
        Section(
            "Cost",
            f"Per prunable layer after the run; latency {after.latency_s * 1e3:.3f} ms on the "
            f"example input; effective MACs x{ratios['effective_macs'] or 0:.3f} and params "
            f"x{ratios['params'] or 0:.3f} of the model before pruning.",
            [layer.to_dict() for layer in [*after.layers, after.total]],
        ),
    ]
    if exported:
        run.sections.append(Section("Export", "Files written.", exported))


def _export(run: Run, folder: Path) -> list[dict[str, object]]:
    rows = []
    for fmt in run.recipe["export"]["formats"]:
        report = export(run.model, fmt, folder / "export", run.example)
        run.console.print(report)
        layers = ", ".join(f"{k}: {v}" for k, v in report.layers.items())
        rows.append(
            {"file": report.path.name, "bytes": report.bytes, "format": fmt, "layers": layers}
        )
    return rows
