"""The HTML report: structure (bars, budget lines, legend, timelines) and a real render in headless Chromium."""
from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gpumem_factories import make_record
from pytest_gpumem._core.budget import Budget
from pytest_gpumem._core.records import TestRecord
from pytest_gpumem._core.categories import CATEGORIES
from pytest_gpumem._reporting.html import COLORS, render_html, write_html

MiB = 2**20


class Elements(HTMLParser):
    """Every start tag with its attributes, plus all text, for structural assertions."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data):
        self.text.append(data)

    def having(self, tag: str | None = None, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if (tag is None or t == tag)
                and all(k in a and (v is None or v in a[k].split() or a[k] == v) for k, v in attrs.items())]


@pytest.fixture
def records() -> list[dict]:
    return [
        make_record("tests/test_m.py::test_fits[adamw]", budget=3_000_000, estimate=2_500_000),
        make_record("tests/test_m.py::test_over", budget=2_000_000, activations=2 * MiB),
        make_record("tests/test_m.py::test_no_budget", activations=40 * MiB),
        TestRecord("tests/test_m.py::test_broken", outcome="failed"),
    ]


def test_one_bar_per_measured_test_with_budget_lines(records: list[TestRecord]) -> None:
    page = Elements(render_html(records))
    bars = page.having("g", **{"class": "bar"})
    assert sorted(b["data-nodeid"] for b in bars) == sorted(r.nodeid for r in records if r.report)
    overview = render_html(records).split('class="overview"')[1].split("</svg>")[0]
    assert overview.count('class="budget"') == sum(1 for r in records if r.budget_total)
    assert overview.count('class="estimate"') == 1
    assert len(page.having("svg", **{"class": "timeline"})) == 3


def test_legend_names_every_category_with_its_colour(records: list[TestRecord]) -> None:
    page = Elements(render_html(records))
    legend = [a["data-category"] for a in page.having("li") if "data-category" in a]
    assert legend == [c.value for c in CATEGORIES]
    segment_colours = {a["data-category"]: a["fill"] for a in page.having("rect") if "data-category" in a}
    assert all(COLORS[cat] == colour for cat, colour in segment_colours.items())


def test_bar_segments_add_up_to_the_peak_split(records: list[TestRecord]) -> None:
    text = render_html(records[:1])
    overview = Elements(text.split('class="overview"')[1].split("</svg>")[0])
    drawn = [a["data-category"] for a in overview.having("rect", **{"class": "segment"})]
    split = records[0].report.peak_split
    assert drawn == [c.value for c in CATEGORIES if split.get(c)]


def test_timeline_has_every_phase_of_every_step_and_a_retained_line(records: list[TestRecord]) -> None:
    report = records[0].report
    page = Elements(render_html(records[:1]))
    phases = [a["data-phase"] for a in page.having("g", **{"class": "phase"})]
    assert phases == [p.value for s in report.steps for p in s.phases]
    assert len(page.having("polyline", **{"class": "retained"})) == 1


def test_self_contained_and_escaped(tmp_path: Path, records: list[TestRecord]) -> None:
    records[0] = records[0].with_changes(nodeid='tests/t.py::test_x[<script>alert("x")</script>]')
    path = write_html(tmp_path / "report.html", records)
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text  # no JS at all, and nodeids are escaped
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    assert "over" in text and "not measured" in text
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium installed")
def test_renders_in_headless_chromium(tmp_path: Path, records: list[TestRecord]) -> None:
    image = pytest.importorskip("PIL.Image")
    page = write_html(tmp_path / "report.html", records)
    shot = tmp_path / "shot.png"
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1400",
               page.as_uri()]
    subprocess.run(command, capture_output=True, timeout=90, check=False, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.exists(), "chromium wrote no screenshot"
    pixels = image.open(shot).convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 20) or []
    painted = sum(n for n, rgb in colours if rgb != (255, 255, 255))
    assert painted > 0.05 * pixels.width * pixels.height  # not blank
    present = {rgb for _, rgb in colours}
    for cat in ("params", "activations", "optimizer"):  # the bars really rendered, in their colours
        hexcode = COLORS[cat].lstrip("#")
        assert tuple(int(hexcode[i:i + 2], 16) for i in (0, 2, 4)) in present, cat


def test_generous_budget_is_drawn_off_the_scale(records: list[TestRecord]) -> None:
    records[0] = records[0].with_changes(budget=Budget(total=100 * records[0].report.peak))
    text = render_html(records[:1])
    assert "off the scale: peak uses 1.0%" in text
    assert text.count('stroke-dasharray="3,2"') == 1  # the overview marks it at the right end
