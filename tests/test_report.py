"""Tests for :func:`prunekit.analysis.report.write_report`."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prunekit.analysis.report import Section, write_report
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
    for key in ("seed", "data", "prunekit", "torch", "python", "machine", "date", "command"):
        assert key in text
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


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(BROWSER is None, reason="no chromium on this machine")
def test_headless_browser_renders_a_non_blank_page(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}"]
    subprocess.run([*cmd, (report / "report.html").as_uri()], check=True, timeout=60)
    pixels = matplotlib.image.imread(shot)
    assert np.ptp(pixels[..., :3]) > 0.5
