"""Whole-recipe checks the per-key schema cannot make: combinations that cannot run.

:func:`load` parses and checks a recipe completely (nothing is built or trained); each
impossible combination raises a :class:`~prunekit.errors.RecipeError` at the line of the
key that has to change: N:M or element masks with physical shrink, a data-driven criterion
or any training without data, a schedule that ends before it starts, a timing method that
does not belong to its ``when``, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit import criteria, export, granularity
from prunekit.errors import PruningError, RecipeError
from prunekit.granularity import NM, Block, Granularity
from prunekit.recipes import schema
from prunekit.recipes.schema import METHODS, error
from prunekit.recipes.source import Path_, Source, parse

SHRINKABLE = ("filter", "row")  # masks that zero whole producers, so shrink removes them
DATA_FREE = "a data-free criterion (magnitude, l1, l2, random)"
STRUCTURAL = ("soft-filter", "slimming")
PRUNE_SECTIONS = ("data", "train", "prune", "schedule", "timing", "finetune", "materialize")


@dataclass(frozen=True)
class Recipe:
    """A checked recipe: ``settings`` (``{section: {key: value}}``, defaults filled in), the
    parsed granularity, and its :class:`Source` for line numbers."""

    settings: dict[str, Any]
    source: Source
    granularity: Granularity | None = None

    @property
    def name(self) -> str:
        """The recipe's ``name``: its report folder under ``runs/``."""
        return self.settings["name"]

    def __getitem__(self, section: str) -> Any:
        return self.settings[section]

    def fail(self, path: Path_, value: Any, problem: str, fix: str) -> RecipeError:
        """An error at ``path``'s line (see :func:`prunekit.recipes.schema.error`)."""
        return error(self.source, path, value, problem, fix)


def _resolve(recipe: Recipe, path: Path_, parse_fn: Any) -> Any:
    value = recipe[path[0]][path[1]]
    try:
        return parse_fn(value)
    except PruningError as err:
        raise recipe.fail(path, value, f"is invalid: {err}", "pick a listed value.") from err


def _check_data(r: Recipe, gran: Granularity) -> None:
    if r["data"]["dataset"] is not None:
        return
    crit = r["prune"]["criterion"]
    if crit in criteria.REGISTRY and criteria.get(crit).requires_data:
        raise r.fail(
            ("prune", "criterion"),
            crit,
            "scores weights on data, but data.dataset is not set",
            f"add 'data: {{dataset: mnist5k}}' or use {DATA_FREE}.",
        )
    for section in ("train", "finetune"):
        if r[section]["epochs"]:
            raise r.fail(
                (section, "epochs"),
                r[section]["epochs"],
                "trains the model, which needs data.dataset",
                "add 'data: {dataset: mnist5k}' or epochs: 0.",
            )
    if r["timing"]["when"] != "after":
        raise r.fail(
            ("timing", "when"),
            r["timing"]["when"],
            "trains the model, which needs data.dataset",
            "add 'data: {dataset: mnist5k}' or when: after.",
        )


def _check_sparsity(r: Recipe, gran: Granularity) -> None:
    p, method = r["prune"], r["timing"]["method"]
    nm = isinstance(gran, NM)
    uniform_only = method in ("lottery", *STRUCTURAL) or (
        method == "at-init" and r["schedule"]["kind"] == "iterative"
    )
    if uniform_only and p["allocation"] != "uniform":
        raise r.fail(
            ("prune", "allocation"),
            p["allocation"],
            f"is not used by {method}, which takes prune.sparsity alone",
            "drop allocation and give e.g. 'sparsity: 0.8'.",
        )
    scheduled = method == "gradual" or (
        method == "finetune" and r["schedule"]["kind"] != "one-shot"
    )
    if scheduled and isinstance(p["allocation"], dict):
        raise r.fail(
            ("prune", "allocation"),
            p["allocation"],
            f"fixes every layer's final sparsity, which the {method} schedule cannot grow "
            "step by step (a Pruner would cut it all at once, or never without sparsity)",
            "allocation: uniform or erk with 'sparsity: 0.8', or a one-shot prune after training.",
        )
    if p["sparsity"] is None and not nm and not isinstance(p["allocation"], dict):
        raise r.fail(
            ("prune", "sparsity"),
            None,
            f"is needed for granularity {gran.name!r}",
            "add e.g. 'sparsity: 0.8' under prune.",
        )
    if nm and p["sparsity"] is not None and abs(p["sparsity"] - gran.sparsity) > 1e-9:
        raise r.fail(
            ("prune", "sparsity"),
            p["sparsity"],
            f"contradicts {gran.name}, which fixes it at {gran.sparsity:g}",
            "drop sparsity.",
        )
    if p["scope"] == "global" and p["allocation"] != "uniform":
        raise r.fail(
            ("prune", "allocation"),
            p["allocation"],
            "applies to local scope only (global ranks all layers together)",
            "scope: local, or drop it.",
        )


def _check_schedule(r: Recipe, gran: Granularity) -> None:
    s, method = r["schedule"], r["timing"]["method"]
    if s["kind"] == "one-shot":
        return
    if s["end"] <= s["start"]:
        raise r.fail(
            ("schedule", "end"),
            s["end"],
            f"is not after start {s['start']}: the schedule ends before it starts",
            "end > start (both fractions of the training phase, e.g. start: 0.0, end: 0.8).",
        )
    if isinstance(gran, NM):
        raise r.fail(
            ("schedule", "kind"),
            s["kind"],
            f"grows the sparsity step by step, which {gran.name} fixes",
            "kind: one-shot.",
        )
    target = r["prune"]["sparsity"] or 0.0
    if s["kind"] == "cubic" and s["initial"] > target:
        raise r.fail(
            ("schedule", "initial"),
            s["initial"],
            f"is above the target {target}",
            "initial <= prune.sparsity.",
        )
    if method in ("soft-filter", "slimming") or (method == "lottery" and s["kind"] == "cubic"):
        raise r.fail(
            ("schedule", "kind"),
            s["kind"],
            f"does not apply to {method} (it has its own rhythm)",
            "kind: one-shot (lottery: iterative rounds).",
        )
    if method == "finetune" and r["finetune"]["epochs"] == 0:
        raise r.fail(
            ("finetune", "epochs"),
            0,
            f"leaves no training for the {s['kind']} schedule to spread over",
            "finetune.epochs >= 1.",
        )
    if method == "at-init" and (s["kind"] == "cubic" or r["prune"]["criterion"] != "synflow"):
        raise r.fail(
            ("schedule", "kind"),
            s["kind"],
            "at initialisation only SynFlow re-scores round by round",
            "kind: one-shot, or iterative with criterion synflow.",
        )


def _check_timing(r: Recipe, gran: Granularity) -> None:
    t, p = r["timing"], r["prune"]
    valid = METHODS[t["when"]]
    if t["method"] is None:
        t["method"] = valid[0]
    if t["method"] not in valid:
        raise r.fail(
            ("timing", "method"),
            t["method"],
            f"is not a method for when: {t['when']}",
            f"one of {', '.join(valid)}.",
        )
    method = t["method"]
    if method in STRUCTURAL and gran.name != "filter":
        raise r.fail(
            ("prune", "granularity"),
            gran.name,
            f"does not fit {method}, which removes whole filters",
            "granularity: filter.",
        )
    if method == "soft-filter" and p["criterion"] not in ("l2", "fpgm"):
        raise r.fail(
            ("prune", "criterion"),
            p["criterion"],
            "is not a soft filter pruning criterion",
            "criterion: l2 or fpgm.",
        )
    if method == "lottery" and p["criterion"] != "magnitude":
        raise r.fail(
            ("prune", "criterion"),
            p["criterion"],
            "is not used by lottery tickets, which prune by magnitude (Frankle & Carbin 2019)",
            "criterion: magnitude, or drop it.",
        )
    if method == "lottery" and (gran.name, p["scope"]) != ("element", "local"):
        raise r.fail(
            ("prune", "granularity"),
            gran.name,
            "does not fit lottery tickets (element masks, local scope)",
            "granularity: element, scope: local.",
        )
    if method in ("gradual", "at-init", "lottery", "soft-filter", "slimming") and (
        r["train"]["epochs"] < 1
    ):
        raise r.fail(
            ("train", "epochs"),
            r["train"]["epochs"],
            f"leaves {method} nothing to train",
            "train.epochs >= 1.",
        )


def _check_outputs(r: Recipe, gran: Granularity) -> None:
    m = r["materialize"]
    sparse_exports = set(r["export"]["formats"]) & set(export.SPARSE)
    if m["mode"] == "sparse" and sparse_exports:
        raise r.fail(
            ("export", "formats"),
            sorted(sparse_exports),
            "converts a model that materialize: sparse has converted already",
            "materialize: bake.",
        )
    structural = r["timing"]["method"] in STRUCTURAL
    if m["mode"] == "shrink" and gran.name not in SHRINKABLE and not structural:
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
    unused = ("llm",) if r["kind"] == "prune" else PRUNE_SECTIONS
    for section in unused:
        if section in given:
            raise r.fail(
                (section,),
                given[section],
                f"does not apply to kind: {r['kind']}",
                f"remove {section}:, or set kind accordingly.",
            )


def _check_llm(r: Recipe) -> None:
    from prunekit.llm.methods import parse_target

    target = _resolve(r, ("llm", "sparsity"), parse_target)
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
    if recipe["kind"] == "llm":
        _check_llm(recipe)
        return recipe
    gran = _resolve(recipe, ("prune", "granularity"), granularity.parse)
    recipe = Recipe(settings, source, gran)
    _check_timing(recipe, gran)
    if recipe["timing"]["method"] not in STRUCTURAL:  # these rank filters their own way
        _resolve(recipe, ("prune", "criterion"), criteria.get)
    for step in (_check_data, _check_sparsity, _check_schedule, _check_outputs):
        step(recipe, gran)
    return recipe


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
