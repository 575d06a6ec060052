"""The recipe schema: every section and key, with its type and default.

The sections a timing method reads (``train``, ``prune``, ``schedule``, ``timing``,
``finetune``) are derived from the methods' settings and :class:`~prunekit.PruneSpec`
(:mod:`prunekit.recipes.methods`): their keys, YAML types and defaults come from those
classes, and the chosen method's own constraints check their values. The recipe's own
sections (``model``, ``data``, ``materialize``, ``export``, ``llm``, ``distill``) are declared here,
their choices taken from where they live (datasets, export and LLM methods).
:func:`check` returns the recipe as ``{section: {key: value}}`` with every default filled
in; every error names ``file:line``, the key, the value and the fix
(:mod:`prunekit.recipes.fields`).
"""

from __future__ import annotations

from typing import Any

from prunekit.errors import RecipeError
from prunekit.export import FORMATS, SPARSE
from prunekit.llm.methods import methods as llm_methods
from prunekit.llm.oneshot import ALLOCATIONS as LLM_ALLOCATIONS
from prunekit.model_spec import DEVICES
from prunekit.recipes import distill
from prunekit.recipes.fields import REQUIRED, Field, error, unknown, value
from prunekit.recipes.methods import sections
from prunekit.recipes.source import Source
from prunekit.zoo.data import DATASETS

FOLDER = "letters, digits, '.', '_' or '-', starting with a letter or digit"


def _folder(name: str) -> str | None:
    ok = name[:1].isalnum() and all(c.isalnum() or c in "._-" for c in name)
    return None if ok else f"is not a folder name ({FOLDER})"


def _formats(formats: list) -> str | None:
    bad = [v for v in formats if v not in FORMATS]
    return f"has unknown formats {bad} (valid: {', '.join(FORMATS)})" if bad else None


SHORTHAND = {"model": "spec", "data": "dataset"}
"""Sections that may be written as their one main key's value."""
_METHOD_SECTIONS = sections()
SCHEMA: dict[str, dict[str, Field] | Field] = {
    "name": Field((str,), REQUIRED, test=_folder, example="name: lenet5-filter"),
    "description": Field((str,), ""),
    "kind": Field((str,), "prune", choices=("prune", "llm")),
    "seed": Field((int,), 0, low=0, example="seed: 0"),
    "device": Field((str,), "cpu", choices=DEVICES, example="device: cpu"),
    "model": {
        "spec": Field((str,), REQUIRED, example="spec: lenet5"),
        "kwargs": Field((dict,), {}, example="kwargs: {in_features: 64}"),
        "checkpoint": Field((str, type(None)), None),
    },
    "data": {  # shorthand: data: mnist5k, data: mypkg.data:loaders
        "dataset": Field((str,), None, choices=DATASETS, also=lambda v: ":" in v),
        "flat": Field((bool,), False),
        "calibration_batches": Field((int,), 4, low=1),
        "batch_size": Field((int,), 64, low=1),
    },
    **{s: _METHOD_SECTIONS[s] for s in ("train", "prune", "schedule", "timing", "finetune")},
    "materialize": {
        "mode": Field((str,), "masks", choices=("masks", "bake", "shrink", "sparse")),
        "format": Field((str,), "auto", choices=SPARSE),
    },
    "export": {
        "formats": Field((list,), [], test=_formats, example="formats: [safetensors, csr]"),
    },
    "llm": {
        "method": Field((str,), "wanda", choices=tuple(llm_methods())),
        "sparsity": Field((int, float, str), 0.5, example="sparsity: 0.5 (or '2:4')"),
        "allocation": Field((str,), "uniform", choices=tuple(LLM_ALLOCATIONS)),
        "samples": Field((int,), 32, low=1),
        "seq_len": Field((int,), 128, low=2),
    },
    "distill": distill.FIELDS,
}


def _section(source: Source, name: str, given: Any, fields: dict[str, Field]) -> dict[str, Any]:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise error(source, (name,), given, "is not a mapping", f"indent its keys under {name}:")
    for key in given:
        if key not in fields:
            raise unknown(source, (name,), key, list(fields))
    out = {}
    for key, spec in fields.items():
        if key not in given:
            if spec.default is REQUIRED:
                raise RecipeError(
                    f"{source.where((name,))}: {name}.{key} is missing; Fix: add {spec.example}"
                )
            out[key] = spec.default
        else:
            out[key] = value(source, (name, key), given[key], spec)
    return out


def check(source: Source) -> dict[str, Any]:
    """Every key of ``source`` checked against :data:`SCHEMA`, defaults filled in."""
    for key in source.data:
        if key not in SCHEMA:
            raise unknown(source, (), key, list(SCHEMA))
    out: dict[str, Any] = {}
    for key, spec in SCHEMA.items():
        given = source.data.get(key)
        if isinstance(spec, dict):
            if key in SHORTHAND and isinstance(given, str):  # model: lenet5, data: digits
                given = {SHORTHAND[key]: given}
            out[key] = _section(source, key, given, spec)
        elif key not in source.data:
            if spec.default is REQUIRED:
                raise RecipeError(f"{source.filename}:1: {key} is missing; Fix: add {spec.example}")
            out[key] = spec.default
        else:
            out[key] = value(source, (key,), given, spec)
    return out
