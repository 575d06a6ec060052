"""Whole-recipe checks: dispatch to the timing method, and the rules between sections.

:func:`load` parses and checks a recipe completely (nothing is built or trained): the
per-key schema (:mod:`prunekit.recipes.schema`), then the chosen timing method's own
settings (:mod:`prunekit.recipes.methods`: its constraints, the keys it takes, the rules
between them), then what no single section can say: a data function
(``data: package.module:function``) that does not import or does not return
:class:`~prunekit.cli_model.Loaders` (it is called here, once), a data-driven criterion or
any training without data, masks that the chosen materialisation or export cannot use (N:M
or element masks with physical shrink, ...). Each raises a
:class:`~prunekit.errors.RecipeError` at the line of the key that has to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit import cli_model, export, granularity, model_spec
from prunekit.cli_model import Loaders
from prunekit.errors import PruningError, RecipeError, UsageError
from prunekit.granularity import NM, Block, Granularity
from prunekit.llm.methods import parse_target
from prunekit.recipes import distill, methods, schema
from prunekit.recipes.fields import error
from prunekit.recipes.methods import PATHS
from prunekit.recipes.source import Path_, Source, parse
from prunekit.training.configs import Method

SHRINKABLE = ("filter", "row")  # masks that zero whole producers, so shrink removes them
DATA_FREE = "a data-free criterion (magnitude, l1, l2, random)"
PRUNE_SECTIONS = ("data", "train", "prune", "schedule", "timing", "finetune", "materialize")


@dataclass(frozen=True)
class Recipe:
    """A checked recipe: ``settings`` (``{section: {key: value}}``, defaults filled in), its
    :class:`Source` for line numbers, and for ``kind: prune`` the timing method's
    ``config`` (:mod:`prunekit.training.configs`), the parsed ``granularity`` and the
    ``loaders`` a data function returned."""

    settings: dict[str, Any]
    source: Source
    config: Method | None = None
    loaders: Loaders | None = None

    @property
    def name(self) -> str:
        """The recipe's ``name``: its report folder under ``runs/``."""
        return self.settings["name"]

    @property
    def granularity(self) -> Granularity | None:
        """What one pruned unit is: the spec's, or the one the method fixes."""
        if self.config is None:
            return None
        spec = getattr(self.config, "spec", None)
        fixed = self.config.fixed.get("granularity")
        return spec.gran if spec is not None else granularity.parse(fixed)

    def __getitem__(self, section: str) -> Any:
        return self.settings[section]

    def fail(self, path: Path_, value: Any, problem: str, fix: str) -> RecipeError:
        """An error at ``path``'s line (see :func:`prunekit.recipes.fields.error`)."""
        return error(self.source, path, value, problem, fix)


def _resolve(recipe: Recipe, path: Path_, parse_fn: Any) -> Any:
    value = recipe[path[0]][path[1]]
    try:
        return parse_fn(value)
    except PruningError as err:
        raise recipe.fail(path, value, f"is invalid: {err}", "pick a listed value.") from err


LOADER_FIXED = ("flat", "batch_size")  # a data function's loaders set both


def _data_function(r: Recipe) -> Loaders:
    """The loaders of ``data.dataset: package.module:function``, called and checked now."""
    given = r.source.data["data"]
    given = given if isinstance(given, dict) else {}
    for key in LOADER_FIXED:
        if key in given:
            raise r.fail(("data", key), given[key], "is not used with a data function (its "
                         "loaders make the batches)", f"drop data.{key}.")  # fmt: skip
    spec = r["data"]["dataset"]
    try:
        return cli_model.user_loaders(spec, r["data"]["calibration_batches"])
    except PruningError as err:
        raise r.fail(("data", "dataset"), spec, f"is invalid: {err}", "fix the data.") from err


def _check_data(r: Recipe) -> Loaders | None:
    """The loaders of a data function (None for a zoo dataset); an error when the method
    needs data and there is none."""
    spec = r["data"]["dataset"]
    if spec is not None:
        return _data_function(r) if ":" in spec else None
    spec = getattr(r.config, "spec", None)
    if spec is not None and spec.crit.requires_data:
        raise r.fail(
            ("prune", "criterion"),
            r["prune"]["criterion"],
            "scores weights on data, but data.dataset is not set",
            f"add 'data: {{dataset: mnist5k}}' or use {DATA_FREE}.",
        )
    for name in ("epochs", "finetune_epochs"):
        if getattr(r.config, name, 0):
            path = PATHS[name]
            raise r.fail(
                path,
                r[path[0]][path[1]],
                "trains the model, which needs data.dataset",
                f"add 'data: {{dataset: mnist5k}}' or {path[1]}: 0.",
            )
    return None


def _check_outputs(r: Recipe) -> None:
    m, gran = r["materialize"], r.granularity
    assert r.config is not None and gran is not None
    sparse_exports = set(r["export"]["formats"]) & set(export.SPARSE)
    if m["mode"] == "sparse" and sparse_exports:
        raise r.fail(
            ("export", "formats"),
            sorted(sparse_exports),
            "converts a model that materialize: sparse has converted already",
            "materialize: bake.",
        )
    if m["mode"] == "shrink" and gran.name not in SHRINKABLE and not r.config.shrinks:
        why = (
            "keeps every channel (N:M zeros are spread out)"
            if isinstance(gran, NM)
            else ("zeros single weights, not whole filters")
        )
        raise r.fail(
            ("materialize", "mode"),
            "shrink",
            f"with granularity {gran.name!r} {why}",
            "granularity: filter (or row), or mode: sparse with format: nm.",
        )
    nm_out = [("materialize", "format")] if m["mode"] == "sparse" and m["format"] == "nm" else []
    nm_out += [("export", "formats")] if "nm" in r["export"]["formats"] else []
    for path in nm_out:
        if not isinstance(gran, NM):
            raise r.fail(path, "nm", f"needs N:M masks, not {gran.name!r}", "granularity: '2:4'.")
    if m["mode"] == "sparse" and m["format"] == "bsr" and not isinstance(gran, Block):
        raise r.fail(
            ("materialize", "format"),
            "bsr",
            f"needs block masks, not {gran.name!r}",
            "granularity: 'block:4x4', or format: csr / auto.",
        )
    for i, fmt in enumerate(r["export"]["formats"]):
        try:
            export.check_format(fmt)
        except PruningError as err:
            raise r.fail(("export", "formats", str(i)), fmt, str(err), "drop it.") from err


def _check_sections(r: Recipe) -> None:
    given = r.source.data
    unused = ("llm", "distill") if r["kind"] == "prune" else PRUNE_SECTIONS
    for section in unused:
        if section in given:
            raise r.fail(
                (section,),
                given[section],
                f"does not apply to kind: {r['kind']}",
                f"remove {section}:, or set kind accordingly.",
            )


def _check_device(r: Recipe) -> None:
    """``device:`` is one this machine has (every kind runs its model there)."""
    try:
        model_spec.device(r["device"])
    except UsageError as err:
        problem = f"is not available on this machine (torch sees no {r['device']} device)"
        raise r.fail(("device",), r["device"], problem, "device: cpu.") from err


def _check_llm(r: Recipe) -> None:
    target = _resolve(r, ("llm", "sparsity"), parse_target)
    distill.settings(r)
    for key in ("kwargs", "checkpoint"):
        if r["model"][key]:
            raise r.fail(
                ("model", key),
                r["model"][key],
                "is not used by kind: llm (it loads a save_pretrained directory as it is)",
                f"drop model.{key}.",
            )
    formats = r["export"]["formats"]
    if set(formats) - {"safetensors"}:
        raise r.fail(
            ("export", "formats"),
            formats,
            "holds formats an LLM run does not write (it saves a save_pretrained directory)",
            "formats: [safetensors].",
        )
    if r["llm"]["allocation"] == "owl" and isinstance(target, NM):
        raise r.fail(
            ("llm", "allocation"),
            "owl",
            f"varies sparsity per block, which {target.name} fixes",
            "allocation: uniform, or a fractional sparsity.",
        )


def check(source: Source) -> Recipe:
    """The :class:`Recipe` of a parsed ``source``, or the first :class:`RecipeError`."""
    settings = schema.check(source)
    recipe = Recipe(settings, source)
    _check_sections(recipe)
    _check_device(recipe)
    if recipe["kind"] == "llm":
        _check_llm(recipe)
        return recipe
    method = methods.method(source, settings["timing"])
    recipe = Recipe(settings, source, methods.settings(source, settings, method))
    loaders = _check_data(recipe)
    _check_outputs(recipe)
    return dataclasses.replace(recipe, loaders=loaders)


def loads(text: str, filename: str = "<recipe>") -> Recipe:
    """Parse and check recipe ``text``."""
    return check(parse(text, filename))


def load(path: str | Path) -> Recipe:
    """Read, parse and check the recipe file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(
            f"recipe {str(path)!r} cannot be read ({err}); Fix: pass a YAML file."
        ) from err
    return loads(text, str(path))
