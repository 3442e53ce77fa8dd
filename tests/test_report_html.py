"""findings.html opened in headless Chromium with the network blocked: the charts
must draw marks from the inlined Vega libraries alone."""

import re
import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
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
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_findings_html_draws_every_chart_offline(tiny_study, tmp_path):
    page = tiny_study / "results/report/findings.html"
    source = page.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=\"?https?:", source), "page must not load anything"
    dom = rendered_dom(page, tmp_path / "profile")
    chart_ids = re.findall(r'<div class="chart[^"]*" id="(chart-[\w-]+)"', dom)
    assert len(chart_ids) == len(list((tiny_study / "results/charts").glob("*.svg"))) == 8, chart_ids
    for chart_id in chart_ids:
        section = dom.split(f'id="{chart_id}"', 1)[1].split('<div class="chart', 1)[0]
        assert "<svg" in section, f"{chart_id} drew nothing"
        marks = re.findall(r'class="mark-(?:symbol|line|rect|text)[^"]*"[^>]*>(.*?)</g>', section, re.S)
        assert any("<path" in m for m in marks), f"{chart_id} has no marks"
