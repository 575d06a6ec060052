"""The ``distill:`` section of a ``kind: llm`` recipe: prune, then recover by distillation.

    kind: llm
    model: char-llama
    llm: {method: wanda, sparsity: 0.5}
    distill: {steps: 200, lr: 1e-3, temperature: 1.0, alpha: 1.0, batch_size: 8}

With the section, the dense model is copied as the teacher before pruning, the pruned
model keeps its masks while :func:`prunekit.training.distill` trains it (so its zeros
stay zeros), and the masks are baked afterwards; the report gives the perplexity of the
dense, the pruned and the distilled model. The section's keys are the fields of
:class:`~prunekit.training.distill.Distillation` (types and defaults from the class,
values checked by its own constraints, each error at its recipe line) plus the shape of
the training batches: ``batch_size`` windows of ``llm.seq_len`` tokens of the zoo text's
training split, drawn with ``seed + 1``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from prunekit.recipes.fields import Field, constrained, yaml_types
from prunekit.training.distill import Distillation, distill
from prunekit.zoo import lm

Recipe = Any  # a checked prunekit.recipes.validate.Recipe (schema imports this module)

SECTION = "distill"
SKIPPED = ("every",)  # checkpointing belongs to a resumable run, not to a recipe's report
QUICK_STEPS = 4
BATCH_KEYS: dict[str, Field] = {"batch_size": Field((int,), 8, low=1, example="batch_size: 8")}


def _fields() -> dict[str, Field]:
    hints = typing.get_type_hints(Distillation)
    out = {
        f.name: Field(yaml_types(hints[f.name]), f.default)
        for f in dataclasses.fields(Distillation)
        if f.name not in SKIPPED
    }
    return out | BATCH_KEYS


FIELDS = _fields()


def settings(recipe: Recipe) -> Distillation | None:
    """The recipe's :class:`Distillation` (None without a ``distill:`` section), each
    value checked by the class's own constraint at its line."""
    if recipe.source.data.get(SECTION) is None:
        return None
    section = recipe[SECTION]
    values = {}
    for name, constraint in Distillation.constraints.items():
        if name not in SKIPPED:
            values[name] = constrained(recipe.source, (SECTION, name), section[name], constraint)
    return Distillation(**values)


def batches(recipe: Recipe, encode: Any, seq_len: int, quick: bool) -> list[Tensor]:
    """The distillation batches: ``steps`` (``--quick``: at most 4) batches of
    ``batch_size`` seeded windows of ``seq_len`` tokens of the training text."""
    s = recipe[SECTION]
    steps = min(s["steps"], QUICK_STEPS) if quick else s["steps"]
    ids = lm.calibration_ids(encode, steps * s["batch_size"], seq_len, recipe["seed"] + 1)
    return list(ids.split(s["batch_size"]))


def recover(
    recipe: Recipe,
    settings: Distillation,
    student: nn.Module,
    teacher: nn.Module,
    encode: Any,
    seq_len: int,
    quick: bool,
    log: Callable[[str], None],
) -> str:
    """Distil the pruned ``student`` from the dense ``teacher`` (its masks keep its zeros);
    a line saying what was done, for the report."""
    data = batches(recipe, encode, seq_len, quick)
    settings = settings.replace(steps=len(data))
    report = distill(student, teacher, data, settings, log=log)
    rows, length = data[0].shape
    return (
        f"Distilled from the dense model on {len(data)} batches of {rows} x {length} random "
        f"windows of the train split (seed {recipe['seed'] + 1}): {report}"
    )
