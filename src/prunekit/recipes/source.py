"""Read a recipe's YAML into plain Python values, remembering the line of every key.

Parsing uses PyYAML's safe machinery only (``yaml.SafeLoader``: no Python objects are ever
built); the node tree from ``compose`` keeps each key's position, so a later validation
error can name ``file:line``. Three fixes over plain ``yaml.safe_load``: ``1e-3`` reads
as a float (YAML 1.1 wants ``1.0e-3``), ``2:4`` as the string it looks like (YAML 1.1:
the base-60 integer 124), and a key given twice is an error instead of the last one
silently winning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from prunekit.errors import RecipeError

Path_ = tuple[str, ...]


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` with YAML 1.2 numbers: ``1e-3`` is a float and ``2:4`` a string
    (YAML 1.1 reads it as the base-60 integer 124)."""


_NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBERS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


@dataclass(frozen=True)
class Source:
    """A parsed recipe: its values, the 1-based line of each key path, and the file name."""

    data: Any
    lines: dict[Path_, int]
    filename: str

    def line(self, path: Path_) -> int:
        """The line of ``path``, or of its nearest ancestor that has one (1 for the root)."""
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def where(self, path: Path_) -> str:
        """``file:line`` of ``path``."""
        return f"{self.filename}:{self.line(path)}"


def _convert(
    loader: _Loader,
    node: yaml.Node,
    path: Path_,
    lines: dict[Path_, int],
    name: str,
    done: dict[int, Any],
):
    """``node`` as Python values, each key's line recorded in ``lines``. A node reached
    again through a YAML alias gives the value already built (``done``), as
    ``yaml.safe_load`` does, so nested aliases cannot blow up exponentially."""
    if node.tag not in _PLAIN_TAGS and not isinstance(node, yaml.ScalarNode):
        raise RecipeError(
            f"{name}:{node.start_mark.line + 1}: tag {node.tag!r} is not allowed in a recipe; "
            "Fix: write plain mappings, lists and values."
        )
    if id(node) in done:
        return done[id(node)]
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = done.setdefault(id(node), {})
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise RecipeError(
                    f"{name}:{line}: key {key!r} is a {type(key).__name__}, not a name; "
                    "Fix: write keys as plain words."
                )
            if key in out:
                raise RecipeError(
                    f"{name}:{line}: key {'.'.join((*path, key))!r} is given twice (first on "
                    f"line {lines[(*path, key)]}); Fix: keep one."
                )
            lines[(*path, key)] = line
            out[key] = _convert(loader, value_node, (*path, key), lines, name, done)
        return out
    if isinstance(node, yaml.SequenceNode):
        items: list[Any] = done.setdefault(id(node), [])
        for i, item in enumerate(node.value):
            lines[(*path, str(i))] = item.start_mark.line + 1
            items.append(_convert(loader, item, (*path, str(i)), lines, name, done))
        return items
    return loader.construct_object(node, deep=True)


def parse(text: str, filename: str = "<recipe>") -> Source:
    """Parse ``text``; raise :class:`RecipeError` with the line for invalid YAML."""
    try:
        loader = _Loader(text)
    except yaml.YAMLError as err:  # a character YAML does not allow (NUL, control codes)
        raise RecipeError(f"{filename}:1: not valid YAML: {err}; Fix: save it as text.") from err
    try:
        node = loader.get_single_node()
        lines: dict[Path_, int] = {}
        data = {} if node is None else _convert(loader, node, (), lines, filename, {})
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise RecipeError(
            f"{filename}:{line}: not valid YAML: {err.problem or err.context}; Fix: check the "
            "indentation and the ':' after each key."
        ) from err
    except yaml.YAMLError as err:
        raise RecipeError(f"{filename}:1: not valid YAML: {err}") from err
    except RecursionError as err:
        raise RecipeError(
            f"{filename}:1: values are nested too deeply to read; Fix: a recipe needs a few "
            "levels at most."
        ) from err
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise RecipeError(
            f"{filename}:1: a recipe is a mapping of sections (name:, model:, prune:, ...), "
            f"not a {type(data).__name__}; Fix: start with 'name: my-run'."
        )
    return Source(data, lines, filename)
