"""Tests for :func:`prunekit.analysis.report.write_report`."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prunekit.analysis.report import Section, rich_table, write_report
from prunekit.errors import PruningError, ReportError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROWS = [
    {"method": "magnitude", "sparsity": 0.5, "accuracy": 0.9712345678901234, "n": 3},
    {"method": "random <b>&", "sparsity": 0.9, "accuracy": 0.1, "n": 3},
]


def _figure() -> Figure:
    fig = Figure(figsize=(3, 2), dpi=50)
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([0, 1, 2], [2, 0, 1])
    return fig


VOID_TAGS = frozenset({"meta", "img", "br", "hr", "link"})


class _Page(HTMLParser):
    """Collects the tags, img sources and text of a page; fails on unbalanced tags."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        elif tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack.pop() == tag

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture
def report(tmp_path: Path) -> Path:
    sections = [
        Section("Results <script>", "Text with <tags> & ampersands.", ROWS, {"curve": _figure()}),
        Section("Only a figure", "", None, {"bars": _figure()}),
    ]
    return write_report("run-1", title="A <title>", sections=sections, out_dir=tmp_path, seed=7)


def _parse(folder: Path) -> _Page:
    page = _Page()
    page.feed((folder / "report.html").read_text())
    page.close()
    assert page.stack == []
    return page


def test_html_parses_escapes_text_and_holds_the_protocol(report: Path) -> None:
    page = _parse(report)
    text = "".join(page.text)
    assert "script" not in page.tags and "tags" not in page.tags and "b" not in page.tags
    assert "Results <script>" in text and "random <b>&" in text and "A <title>" in text
    for key in ("seed", "data", "prunekit", "torch", "python", "machine", "load", "date"):
        assert key in text
    assert "command" in text and "(1 / 5 / 15 min)" in text
    assert "0.9712" in text  # tables show 4 significant digits


def test_every_image_is_an_embedded_non_blank_png(report: Path) -> None:
    images = _parse(report).images
    assert len(images) == 2
    for src in images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_SIGNATURE)
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.shape[:2] == (100, 150)
        assert np.ptp(pixels[..., :3]) > 0.5  # dark lines on a white background


def test_markdown_figures_and_raw_numbers(report: Path) -> None:
    md = (report / "report.md").read_text()
    assert "![curve](figures/curve.png)" in md and "## Protocol" in md
    assert "| method | sparsity | accuracy | n |" in md
    for stem in ("curve", "bars"):
        assert (report / "figures" / f"{stem}.png").read_bytes().startswith(PNG_SIGNATURE)
        assert (report / "figures" / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    with (report / "results-script.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["accuracy"]) for r in rows] == [r["accuracy"] for r in ROWS]
    assert [r["method"] for r in rows] == [r["method"] for r in ROWS]
    data = json.loads((report / "results.json").read_text())
    assert data["sections"][0]["rows"] == ROWS
    assert data["protocol"]["seed"] == "7"


@pytest.mark.parametrize(
    ("name", "sections", "match"),
    [
        ("../escape", [Section("a")], "one folder name"),
        ("", [Section("a")], "one folder name"),
        ("ok", [], "at least one Section"),
        (
            "ok",
            [Section("a", figures={"x": _figure()}), Section("b", figures={"x": _figure()})],
            "x",
        ),
        ("ok", [Section("a", figures={"a/b": _figure()})], "plain file stems"),
    ],
)
def test_bad_input_raises_and_writes_nothing(
    tmp_path: Path, name: str, sections: list[Section], match: str
) -> None:
    with pytest.raises(ReportError, match=match) as err:
        write_report(name, title="t", sections=sections, out_dir=tmp_path)
    assert isinstance(err.value, PruningError)
    assert list(tmp_path.iterdir()) == []


def test_sections_are_linked_and_text_columns_left_aligned(report: Path) -> None:
    page = (report / "report.html").read_text()
    assert '<a href="#results-script">Results &lt;script&gt;</a>' in page
    assert '<h2 id="results-script">' in page and '<h2 id="protocol">' in page
    assert '<td class="text">magnitude</td><td>0.5</td>' in page


NAMES = st.text(alphabet="abc xyz_-", min_size=1, max_size=8)


@given(
    st.lists(
        st.tuples(NAMES, st.integers(-(10**12), 10**12), st.floats(-1e9, 1e9)).map(
            lambda t: dict(zip(("name", "count", "value"), t, strict=True))
        ),
        min_size=1,
        max_size=4,
    )
)
def test_terminal_table_cells_read_back_as_the_values(rows: list[dict]) -> None:
    table = rich_table(Section("numbers", rows=rows))
    assert table.title == "numbers"
    assert [c.header for c in table.columns] == ["name", "count", "value"]
    assert [c.justify for c in table.columns] == ["left", "right", "right"]
    names, counts, values = (list(c.cells) for c in table.columns)
    for row, name, count, value in zip(rows, names, counts, values, strict=True):
        assert name == row["name"]
        assert int(count.replace(",", "")) == row["count"]  # thousands separators only
        shown = float(value.replace(",", ""))
        big = abs(row["value"]) >= 1e4  # whole numbers from 10,000 up, else 4 digits
        assert shown == pytest.approx(row["value"], rel=0 if big else 5e-4, abs=0.5 if big else 0)


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
# `make test` installs Debian's chromium when run as root (CI); only elsewhere may it be absent.
needs_browser = pytest.mark.skipif(
    BROWSER is None and not os.environ.get("CI"), reason="no chromium on this machine"
)
# Headless, no sandbox (root in CI), and offline: no background traffic, no DNS at all.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
# After the load event, write how many images there are and how many decoded.
IMAGE_CHECK = (
    "<script>window.addEventListener('load', () => {"
    "const all = [...document.images];"
    "const ok = all.filter(i => i.complete && i.naturalWidth > 0).length;"
    "const out = document.createElement('pre'); out.id = 'browser-check';"
    "out.textContent = `images ${all.length} decoded ${ok}`;"
    "document.body.appendChild(out);});</script>"
)
SHOT = (1200, 1600)  # width, height of the screenshot


def render_in_browser(page: Path, work: Path) -> tuple[str, np.ndarray]:
    """Open ``page`` in headless chromium: the DOM after the load event (a copy of the page,
    moved to ``work`` so that it must be self-contained, carrying :data:`IMAGE_CHECK`) and
    the pixels of a screenshot of the page itself."""
    assert BROWSER is not None
    checked = work / "checked.html"
    checked.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    base = [BROWSER, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'profile'}"]
    run = {"capture_output": True, "text": True, "check": True, "timeout": 120}
    dom = subprocess.run([*base, "--dump-dom", checked.as_uri()], **run).stdout
    shot = work / "shot.png"
    size = f"--window-size={SHOT[0]},{SHOT[1]}"
    subprocess.run([*base, size, f"--screenshot={shot}", page.as_uri()], **run)
    return dom, matplotlib.image.imread(shot)


def assert_renders(page: Path, work: Path, title: str, images: int) -> None:
    """The page loads with its title, all ``images`` decode, the screenshot is not blank."""
    dom, pixels = render_in_browser(page, work)
    assert f"<h1>{html.escape(title, quote=False)}</h1>" in dom  # as the DOM serialises it
    assert f'<pre id="browser-check">images {images} decoded {images}</pre>' in dom
    assert pixels.shape[:2] == (SHOT[1], SHOT[0])
    colours = np.unique(pixels[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 16  # text, table borders and figures, not one flat colour


@needs_browser
def test_headless_browser_renders_the_report(report: Path, tmp_path: Path) -> None:
    assert_renders(report / "report.html", tmp_path, "A <title>", images=2)


@needs_browser
def test_headless_browser_sees_a_broken_image(report: Path, tmp_path: Path) -> None:
    page = report / "report.html"
    page.write_text(page.read_text().replace("base64,iVBOR", "base64,AAAA", 1))
    dom, _ = render_in_browser(page, tmp_path)
    assert "images 2 decoded 1" in dom
