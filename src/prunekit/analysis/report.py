"""Self-contained run reports: ``runs/<name>/`` with HTML, Markdown, figures and raw numbers.

:func:`write_report` writes, for a list of :class:`Section` s:

=====================  ==============================================================
``report.html``        one file: every figure embedded as a base64 PNG data URI, tables
                       as HTML, all text escaped, and the protocol block (seed, data,
                       prunekit / torch / python versions, machine and load, date,
                       command line)
``report.md``          the same content; figures linked as ``figures/<name>.png``
``figures/``           each figure as ``<name>.png`` and ``<name>.svg``
``<section>.csv``      the rows of each section that has a table (raw values)
``results.json``       title, protocol and every section's text and rows (raw values)
=====================  ==============================================================
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import os
import platform
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from rich.table import Table

import prunekit
from prunekit.errors import ReportError

if TYPE_CHECKING:  # matplotlib loads only when a figure is passed
    from matplotlib.figure import Figure

Row = Mapping[str, object]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:14px}"
    "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
    "td.text,th.text{text-align:left}"
    "img{max-width:100%;display:inline-block;vertical-align:top;margin:.5em 1em .5em 0}"
    "dl{display:grid;"
    "grid-template-columns:max-content auto;gap:2px 1em}dt{font-weight:bold}"
)


class Section(NamedTuple):
    """One part of a report: a heading, a paragraph, an optional table (a list of rows,
    each ``{column: value}``) and optional figures ``{file stem: Figure}``."""

    heading: str
    text: str = ""
    rows: Sequence[Row] | None = None
    figures: Mapping[str, Figure] | None = None


def _load() -> str:
    """The 1, 5 and 15-minute load averages: timings taken on a busy machine are noisy."""
    if not hasattr(os, "getloadavg"):  # not on Windows
        return "-"
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def protocol(seed: object = None, data: str | None = None) -> dict[str, str]:
    """How the run was made: seed, data, versions, machine and its load, UTC date and
    command line."""
    return {
        "seed": "-" if seed is None else str(seed),
        "data": data or "-",
        "prunekit": prunekit.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "load": _load(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
    }


def _cell(value: object) -> str:
    """Integers with thousands separators; floats to 4 significant digits, whole numbers
    from 10,000 up; None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _columns(rows: Sequence[Row]) -> list[str]:
    """The union of the rows' keys, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "section"


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    return buffer.getvalue()


def _text_columns(rows: Sequence[Row]) -> set[str]:
    """Columns holding text in some row: left-aligned; numbers are right-aligned."""
    return {key for row in rows for key, value in row.items() if isinstance(value, str)}


def _anchors(sections: Sequence[Section]) -> list[str]:
    """One unique slug per section (``results``, ``results-2``, ...): its HTML id and the
    stem of its CSV file."""
    used: dict[str, int] = {}
    anchors = []
    for section in sections:
        slug = _slug(section.heading)
        used[slug] = used.get(slug, 0) + 1
        anchors.append(slug if used[slug] == 1 else f"{slug}-{used[slug]}")
    return anchors


def _html_table(rows: Sequence[Row]) -> str:
    columns, text = _columns(rows), _text_columns(rows)
    attrs = {c: ' class="text"' if c in text else "" for c in columns}
    head = "".join(f"<th{attrs[c]}>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td{attrs[c]}>{html.escape(_cell(row.get(c)))}</td>" for c in columns)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def rich_table(section: Section) -> Table:
    """A section's rows as a rich table for the terminal, titled with its heading: the
    cells of the report's tables (text columns left-aligned, numbers right-aligned)."""
    table = Table(title=section.heading)
    rows = section.rows or []
    columns, text = _columns(rows), _text_columns(rows)
    for column in columns:
        table.add_column(column, justify="left" if column in text else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    return table


def _md_table(rows: Sequence[Row]) -> str:
    columns = _columns(rows)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    body = [line([_cell(row.get(c)) for c in columns]) for row in rows]
    return "\n".join([line(columns), "|" + "---:|" * len(columns), *body])


def _check(name: str, sections: Sequence[Section]) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ReportError(
            f"report name {name!r} must be one folder name (letters, digits, '.', '_', '-'); "
            "Fix: pass e.g. 'sweep-lenet300'."
        )
    if not sections:
        raise ReportError("a report needs at least one Section; Fix: pass sections=[...]")
    stems = [stem for s in sections for stem in (s.figures or {})]
    bad = sorted({s for s in stems if stems.count(s) > 1 or not _NAME.match(s)})
    if bad:
        raise ReportError(
            f"figure names {bad} are repeated or not plain file stems; "
            "Fix: give every figure a unique name of letters, digits, '.', '_', '-'."
        )


def write_report(
    name: str,
    *,
    title: str,
    sections: Sequence[Section],
    out_dir: str | os.PathLike[str] = "runs",
    seed: object = None,
    data: str | None = None,
) -> Path:
    """Write ``<out_dir>/<name>/`` (see the module docstring) and return that folder.

    ``seed`` and ``data`` go into the protocol block with the versions, machine, date and
    command line. Existing files of the same names are overwritten.

    Raises:
        ReportError: a name that is not one folder name, no sections, or figure names that
            repeat or are not plain file stems. Nothing is written then.

    Example:
        >>> write_report("sweep", title="LeNet sweep", sections=[Section("Results", "...", rows)])
    """
    _check(name, sections)
    folder = Path(out_dir) / name
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    proto = protocol(seed, data)
    esc = html.escape
    anchors = _anchors(sections)
    contents = "".join(
        f'<li><a href="#{a}">{esc(s.heading)}</a></li>'
        for a, s in zip(anchors, sections, strict=True)
    )
    page = [f"<h1>{esc(title)}</h1>", f'<nav><ul>{contents}<li><a href="#protocol">Protocol'
            "</a></li></ul></nav>"]  # fmt: skip
    md = [f"# {title}", ""]
    for anchor, section in zip(anchors, sections, strict=True):
        page += [f'<h2 id="{anchor}">{esc(section.heading)}</h2>', f"<p>{esc(section.text)}</p>"]
        md += [f"## {section.heading}", "", section.text, ""]
        if section.rows:
            page.append(_html_table(section.rows))
            md += [_md_table(section.rows), ""]
            _write_csv(folder / f"{anchor}.csv", section.rows)
        for stem, fig in (section.figures or {}).items():
            png = _png(fig)
            (folder / "figures" / f"{stem}.png").write_bytes(png)
            fig.savefig(folder / "figures" / f"{stem}.svg", format="svg")
            uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            page.append(f'<img src="{uri}" alt="{esc(stem)}">')
            md += [f"![{stem}](figures/{stem}.png)", ""]
    page.append('<h2 id="protocol">Protocol</h2><dl>')
    page += [f"<dt>{esc(k)}</dt><dd><code>{esc(v)}</code></dd>" for k, v in proto.items()]
    page.append("</dl>")
    md += ["## Protocol", "", *(f"- **{k}**: `{v}`" for k, v in proto.items()), ""]
    (folder / "report.html").write_text(
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(page)
        + "\n</body></html>\n",
        encoding="utf-8",
    )
    (folder / "report.md").write_text("\n".join(md), encoding="utf-8")
    results = {
        "title": title,
        "protocol": proto,
        "sections": [
            {"heading": s.heading, "text": s.text, "rows": [dict(r) for r in s.rows or []]}
            for s in sections
        ],
    }
    (folder / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return folder


def _write_csv(path: Path, rows: Sequence[Row]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(rows)
