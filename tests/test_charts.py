"""The charts' specs as findings.html embeds them: one colour per quantization and one shape per method or
module set in every chart, quality metrics as points on fitted axes, every run's tooltip naming it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import altair as alt
import pandas as pd
import pytest

from lora_study.questions.memory_plan import MEMORY_TERMS, OVERHEAD_TERMS, memory_terms
from lora_study.report.style import CHART_FORMATS, QUANT_COLOURS, RANK_TITLE, save_chart

QUALITY = {"perplexity", "accuracy"}


def embedded_specs(page: str) -> dict[str, dict]:
    """Every chart spec the page hands to vegaEmbed, by chart name."""
    found = re.finditer(r"vegaEmbed\('#chart-([\w-]+)', (.*?), \{renderer: 'svg'", page)
    return {name: json.loads(spec) for name, spec in (m.groups() for m in found)}


def units(spec: dict) -> Iterator[dict]:
    """Every single-mark view of a (layered, concatenated or faceted) spec."""
    if "mark" in spec:
        yield spec
    for key in ("layer", "hconcat", "vconcat", "concat"):
        for child in spec.get(key, []):
            yield from units(child)
    if "spec" in spec:
        yield from units(spec["spec"])


@pytest.fixture(scope="module")
def specs(tiny_study) -> dict[str, dict]:
    return embedded_specs((tiny_study / "results/report/findings.html").read_text())


def mark_type(unit: dict) -> str:
    return unit["mark"]["type"] if isinstance(unit["mark"], dict) else unit["mark"]


def test_every_chart_gives_a_quantization_one_colour_and_a_module_set_one_shape(specs):
    colours: dict[str, str] = {}
    shapes: dict[str, str] = {}
    coloured = set()
    for name, spec in specs.items():
        for unit in units(spec):
            encoding = unit.get("encoding", {})
            colour = encoding.get("color", {})
            if colour.get("field") == "quantization":
                coloured.add(name)
                for label, value in zip(colour["scale"]["domain"], colour["scale"]["range"], strict=True):
                    assert value == QUANT_COLOURS[label], (name, label)
                    colours.setdefault(label, value)
            if "shape" in encoding:
                shape = encoding["shape"]
                assert shape["field"] == "modules", name  # one method in this study: shape = module set
                for value, symbol in zip(shape["scale"]["domain"], shape["scale"]["range"], strict=True):
                    assert shapes.setdefault(value, symbol) == symbol, (name, value)
    assert set(colours) == {"nf4", "fp32"}
    assert set(shapes) == {"qv", "qkvo-mlp"}  # every trained module set of the study, in every chart
    # Every chart of runs colours them by quantization (heatmaps colour by perplexity, the breakdown by term,
    # the comparisons chart, whose marks are pairs of runs, by verdict).
    assert coloured == set(specs) - {"memory_breakdown", "comparisons"}


def test_quality_is_drawn_as_points_on_fitted_axes_and_only_zero_based_quantities_as_bars(specs):
    bars, quality_points = [], []
    for name, spec in specs.items():
        for unit in units(spec):
            encoding = unit.get("encoding", {})
            fields = {axis: encoding.get(axis, {}).get("field") for axis in ("x", "y")}
            if mark_type(unit) == "bar":
                assert not QUALITY & set(fields.values()), name
                bars.append(name)
            if mark_type(unit) == "point" and fields["y"] in QUALITY:
                assert encoding["y"]["scale"]["zero"] is False, name
                quality_points.append(name)
    # The checks above met real marks: the study's bar charts and its quality-against-setting charts.
    assert {"memory_vs_rank", "perplexity_by_modules", "quantization", "memory_breakdown"} <= set(bars)
    assert {"quality_vs_rank", "memory_vs_perplexity", "perplexity_by_modules", "quantization"} <= set(quality_points)


def test_every_point_and_bar_tooltip_names_its_run(specs):
    """Every point (a run, or a pair of runs) has a tooltip; every point, bar or tick tooltip names its run(s)."""
    checked = set()
    for name, spec in specs.items():
        for unit in units(spec):
            tooltip = unit.get("encoding", {}).get("tooltip")
            assert tooltip or mark_type(unit) != "point", name
            if mark_type(unit) in ("point", "bar", "tick") and tooltip:
                fields = {t.get("field") for t in tooltip}
                # A run, or for a verdict the two runs it compares.
                assert "run_id" in fields or {"candidate", "reference"} <= fields, name
                checked.add(name)
    assert checked == set(specs) - {"loss_curves"}  # the loss curves are lines


def test_rank_axes_tick_exactly_the_swept_ranks(specs, tiny_study):
    ranks = pd.read_csv(tiny_study / "results/tables/derived/rank.csv")["rank"]
    axes = [unit["encoding"]["x"] for unit in units(specs["quality_vs_rank"]["hconcat"][0])]
    assert axes
    for x in axes:
        assert x["title"] == RANK_TITLE and x["axis"]["values"] == sorted(ranks)


def test_memory_breakdown_terms_add_up_to_the_prediction(tiny_study):
    runs = pd.read_csv(tiny_study / "results/tables/runs.csv")
    trained = runs[~runs["is_baseline"].astype(bool)]
    assert not trained.empty
    for run in trained.to_dict("records"):
        plan = {k.removeprefix("plan_"): v for k, v in run.items() if k.startswith("plan_")}
        terms = memory_terms(plan, "cpu")
        assert set(terms) == {*MEMORY_TERMS, OVERHEAD_TERMS["cpu"]}
        assert sum(terms.values()) == pytest.approx(run["plan_predicted_cpu_gb"])
        assert terms["LoRA weights"] * 1024**3 == pytest.approx(run["trainable_params"] * 4)
        assert all(value >= 0 for value in terms.values()), terms


def test_each_chart_file_is_what_altair_itself_saves(tmp_path):
    """save_chart builds the spec once for its three formats; each file must equal chart.save's own."""
    points = pd.DataFrame({"rank": [4, 8, 16], "perplexity": [6.0, 5.2, 5.1], "run_id": ["a", "b", "c"]})
    # A line over more rows than altair's default limit (5,000): saving must not refuse them, as chart.save doesn't.
    curve = pd.DataFrame({"rank": range(5001), "perplexity": [5 + i % 7 / 10 for i in range(5001)]})
    chart = alt.layer(
        alt.Chart(points).mark_point().encode(x="rank:Q", y="perplexity:Q", tooltip=["run_id"]),
        alt.Chart(curve).mark_line().encode(x="rank:Q", y="perplexity:Q"),
    )
    written = save_chart(chart, tmp_path, "chart")
    assert [path.suffix[1:] for path in written] == list(CHART_FORMATS)
    for path in written:
        fmt = path.suffix[1:]
        options = {"inline": True} if fmt == "html" else {"scale_factor": 2} if fmt == "png" else {}
        expected = tmp_path / f"expected.{fmt}"
        chart.save(str(expected), format=fmt, **options)
        assert path.read_bytes() == expected.read_bytes(), fmt
