"""findings.html opened in headless Chromium with the network blocked: the charts
must draw marks from the inlined Vega libraries alone."""

import re
import shutil

import pytest

from conftest import require, run_guarded

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NEEDS_CHROMIUM = "needs Debian's chromium (.ci/run installs it)"
# Any request would fail: no proxy answers, no host name resolves.
OFFLINE_FLAGS = [
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def rendered_dom(page, user_data_dir) -> str:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        f"--user-data-dir={user_data_dir}", *OFFLINE_FLAGS,
        "--virtual-time-budget=15000", "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    result = run_guarded(command)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def dom(tiny_study, tmp_path_factory) -> str:
    require(CHROMIUM is not None, NEEDS_CHROMIUM)
    return rendered_dom(tiny_study / "results/report/findings.html", tmp_path_factory.mktemp("profile"))


def chart_sections(dom: str) -> dict[str, str]:
    """Each chart's rendered markup, by chart id."""
    chart_ids = re.findall(r'<div class="chart[^"]*" id="(chart-[\w-]+)"', dom)
    return {chart_id: dom.split(f'id="{chart_id}"', 1)[1].split('<div class="chart', 1)[0] for chart_id in chart_ids}


def rendered_axes(section: str) -> list[tuple[str, list[str]]]:
    """(Vega's accessible description, tick labels) of every axis drawn in a chart."""
    axes = []
    for match in re.finditer(r'aria-roledescription="axis" aria-label="([^"]*)"', section):
        rest = section[match.end() :]
        labels_group = rest.split("role-axis-label", 1)[1].split("</g>", 1)[0] if "role-axis-label" in rest else ""
        axes.append((match[1], re.findall(r"<text[^>]*>([^<]*)</text>", labels_group)))
    return axes


def test_every_rendered_chart_titles_its_axes_and_ticks_rank_at_the_swept_ranks(tiny_study, dom):
    import pandas as pd

    runs = pd.read_csv(tiny_study / "results/tables/runs.csv")
    swept = sorted(str(int(r)) for r in set(runs.loc[~runs["is_baseline"].astype(bool), "rank"]))
    sections = chart_sections(dom)
    assert len(sections) == 11
    rank_axes = 0
    for chart_id, section in sections.items():
        axes = rendered_axes(section)
        assert {a[:1] for a, _ in axes} == {"X", "Y"}, f"{chart_id} lacks an x or a y axis"
        for description, ticks in axes:
            assert re.match(r"[XY]-axis titled '[^']+'", description), f"{chart_id}: untitled axis ({description})"
            if "rank (log scale)" in description:
                rank_axes += 1
                assert ticks == swept, f"{chart_id}: rank ticks {ticks}, swept ranks {swept}"
    # quality vs rank (perplexity and accuracy panels) and effective rank (a panel per module group).
    assert rank_axes >= 4


def test_findings_html_loads_nothing_and_inlines_its_libraries(tiny_study):
    """Checked without a browser: no external script or stylesheet; Vega, Vega-Lite and vega-embed inlined."""
    source = (tiny_study / "results/report/findings.html").read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=\"?https?:", source), "page must not load anything"
    scripts = re.findall(r"<script type='text/javascript'>(.*?)</script>", source, re.S)
    # The libraries (hundreds of kB of code) in the page itself, then one vegaEmbed call per chart.
    assert len(scripts) == 2 and len(scripts[0]) > 500_000
    assert scripts[1].count("vegaEmbed('#chart-") == len(list((tiny_study / "results/charts").glob("*.svg"))) == 11


def test_findings_html_draws_every_chart_offline(tiny_study, tmp_path):
    require(CHROMIUM is not None, NEEDS_CHROMIUM)
    page = tiny_study / "results/report/findings.html"
    dom = rendered_dom(page, tmp_path / "profile")
    chart_ids = re.findall(r'<div class="chart[^"]*" id="(chart-[\w-]+)"', dom)
    assert len(chart_ids) == len(list((tiny_study / "results/charts").glob("*.svg"))) == 11, chart_ids
    for chart_id in chart_ids:
        section = dom.split(f'id="{chart_id}"', 1)[1].split('<div class="chart', 1)[0]
        assert "<svg" in section, f"{chart_id} drew nothing"
        marks = re.findall(r'class="mark-(?:symbol|line|rect|text)[^"]*"[^>]*>(.*?)</g>', section, re.S)
        assert any("<path" in m for m in marks), f"{chart_id} has no marks"
