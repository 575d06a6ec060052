"""YAML recipes: a whole pruning pipeline in one file, run with ``prunekit run recipe.yaml``.

    name: lenet5-filter-l2          # the report goes to runs/<name>/
    description: Filter pruning by L2 norm, fine-tuned.
    seed: 0
    device: cpu                     # cpu | cuda | mps (one this machine has)
    model: lenet5                   # zoo name, package.module:factory or a transformers dir
    data: {dataset: mnist5k}        # digits | mnist5k | mnist1d (flat, batch_size, ...),
                                    # or package.module:function returning loaders
    train: {epochs: 2, lr: 1e-3}    # dense training (optimizer: adam | sgd)
    prune:
      granularity: filter           # element, row, column, kernel, filter, channel,
                                    # block:AxB, N:M ('2:4')
      criterion: l2                 # magnitude, l1, l2, gradient, taylor, random, snip, ...
      scope: local                  # local | global; allocation: uniform | erk | {layer: s}
      sparsity: 0.5
      exclude: [fc3]
    schedule: {kind: one-shot}      # one-shot | iterative | cubic; start, end (fractions of
                                    # the training phase), rounds, spacing, initial
    timing: {when: after}           # after: finetune | during: gradual, soft-filter,
                                    # slimming | before: at-init, lottery (method:)
    finetune: {epochs: 1, lr: 1e-4}
    materialize: {mode: shrink}     # masks | bake | shrink | sparse (format: auto|csr|bsr|nm)
    export: {formats: [safetensors, onnx]}   # also csr, bsr, nm, auto

Each timing method takes only the keys of its own settings class
(:mod:`prunekit.training.configs`, from which these sections are derived): a key the
chosen method would ignore is an error naming the method's type and the keys it takes.
``kind: llm`` prunes a causal LM instead (sections ``model`` and ``llm``: ``method``
wanda | sparsegpt | magnitude, ``sparsity`` 0.5 or '2:4', ``allocation`` uniform | owl,
``samples``, ``seq_len``; on ``device``); a ``distill:`` section then recovers the pruned model by
distillation from the dense one (:mod:`prunekit.recipes.distill`). ``data:
package.module:function`` (or ``data: {dataset: ..., calibration_batches: 4}``) is called
once when the recipe is read and must return ``{'train': loader, 'eval': loader[,
'calibration': batches]}`` (:class:`prunekit.cli_model.Loaders`); training, accuracy and
calibration then use those loaders as they are. The recipe is checked
completely before anything is built or trained (:mod:`prunekit.recipes.validate`); every
error names ``file:line``, the key, the value and the fix. ``--quick`` trains at most one
epoch on 256 images (CI).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from prunekit.analysis.report import Section, write_report
from prunekit.recipes import llm, pipeline
from prunekit.recipes.validate import PRUNE_SECTIONS, Recipe, load, loads

__all__ = ["Recipe", "load", "loads", "run", "run_file"]


def _settings_rows(recipe: Recipe) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    skip = ("llm",) if recipe["kind"] == "prune" else PRUNE_SECTIONS
    skip += () if recipe.source.data.get("distill") is not None else ("distill",)
    for section, value in recipe.settings.items():
        if section in skip:
            continue
        items = value.items() if isinstance(value, dict) else [("", value)]
        for key, v in items:
            rows.append({"setting": f"{section}.{key}".rstrip("."), "value": str(v)})
    return rows


def run(
    recipe: Recipe, *, out_dir: str | Path = "runs", quick: bool = False, console: Console
) -> Path:
    """Run a checked ``recipe`` and write its report to ``<out_dir>/<name>/``; return that
    folder. Everything that can fail on the recipe's settings fails before training."""
    folder = Path(out_dir) / recipe.name
    intro = recipe["description"] + (" (--quick: 1 epoch, 256 images)" if quick else "")
    sections = [Section("Recipe", intro, _settings_rows(recipe))]
    if recipe["kind"] == "llm":
        sections += llm.run(recipe, quick, console, folder)
        data = "pydoc_data topics (char-level)"
    else:
        state = pipeline.prepare(recipe, quick, console)
        pipeline.dry_run(state)
        pipeline.execute(state, folder)
        sections += state.sections
        data = recipe["data"]["dataset"]
    title = f"prunekit run {recipe.name}"
    return write_report(
        recipe.name, title=title, sections=sections, out_dir=out_dir, seed=recipe["seed"], data=data
    )


def run_file(
    path: str | Path, *, out_dir: str | Path = "runs", quick: bool = False, console: Console
) -> Path:
    """:func:`load` the recipe at ``path`` and :func:`run` it."""
    return run(load(path), out_dir=out_dir, quick=quick, console=console)
