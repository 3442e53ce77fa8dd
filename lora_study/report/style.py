"""How every chart of the report looks: one colour per weight format, one shape per method or module set, the
tooltips that name a run, rank axes, points with their intervals; and saving a chart as HTML, SVG and PNG.

Every chart marks a run the same way: its colour is its quantization (a fixed colour per weight format) and
its shape its method, or its target-module set when the study uses one method. Perplexity and accuracy are
points with their 95 % intervals on an axis fitted to the data; only quantities that start at zero (memory,
parameters, time per token) are bars from zero. Rank axes are log2 with a tick at every swept rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import altair as alt
import pandas as pd
from altair.utils.save import save as save_spec

from lora_study.analysis.runs import trained_runs
from lora_study.core.io import atomic_path

CHART_FORMATS = ("html", "svg", "png")


WIDTH, HEIGHT = 360, 240


# One colour per weight format (quantization label), the same in every chart and every study.
QUANT_COLOURS = {
    "nf4": "#4c78a8",
    "nf4-nodq": "#9ecae9",
    "fp4": "#72b7b2",
    "fp4-nodq": "#b5ddd9",
    "int8": "#f58518",
    "16bit": "#e45756",
    "bf16": "#54a24b",
    "fp16": "#eeca3b",
    "fp32": "#b279a2",
}


OTHER_COLOUR = "#888888"


SHAPES = ("circle", "square", "triangle-up", "diamond", "cross", "triangle-down", "triangle-right", "wedge")


DASHES = ([1, 0], [6, 3], [2, 2], [8, 3, 2, 3], [1, 3], [10, 4], [4, 1], [3, 6])


METRIC_TITLES = {
    "perplexity": "perplexity (validation responses, lower is better)",
    "accuracy": "exact-match accuracy (held-out prompts)",
}


RANK_TITLE = "LoRA rank (log scale)"


# What a chart's tooltip shows of its run: (column, title, format); columns the frame lacks are left out.
RUN_TOOLTIP = (
    ("run_id", "run", None),
    ("method", "method", None),
    ("modules", "target modules", None),
    ("quantization", "quantization", None),
    ("rank", "rank", "d"),
    ("perplexity", "perplexity", ".4g"),
    ("perplexity_low", "perplexity 95% low", ".4g"),
    ("perplexity_high", "perplexity 95% high", ".4g"),
    ("accuracy", "accuracy", ".3f"),
    ("peak_memory_gb", "peak memory (GB)", ".3f"),
    ("train_wall_s", "training time (s)", ".1f"),
    ("train_tokens_per_s", "training tokens/s", ".4g"),
    ("trainable_params", "trainable parameters", ",d"),
    ("adapter_size_mb", "adapter size (MB)", ".3g"),
)


@dataclass(frozen=True)
class Style:
    """How runs are told apart in every chart, and what their tooltips show.

    `runs` holds one row per run with the chart-facing names: run_id, quantization (label), modules (label),
    method and the RUN_TOOLTIP metrics (with their own 95 % intervals where they were judged).
    """

    runs: pd.DataFrame
    memory_title: str

    @classmethod
    def of(cls, prepared: pd.DataFrame, memory_title: str) -> Style:
        runs = prepared.drop(columns=["quantization", "modules"]).rename(
            columns={"quant_label": "quantization", "modules_label": "modules"}
        )
        return cls(runs=runs, memory_title=memory_title)

    @property
    def quantizations(self) -> list[str]:
        present = list(dict.fromkeys(self.runs["quantization"].dropna()))
        return sorted(present, key=lambda q: list(QUANT_COLOURS).index(q) if q in QUANT_COLOURS else len(QUANT_COLOURS))

    @property
    def shape_field(self) -> str:
        return "method" if self.runs["method"].nunique() > 1 else "modules"

    @property
    def shape_values(self) -> list[str]:
        """Methods in study order, or module sets by trainable parameters; the base models' value last."""
        trained = trained_runs(self.runs)
        ordered = trained.sort_values("trainable_params", kind="stable") if self.shape_field == "modules" else trained
        values = [*ordered[self.shape_field].dropna(), *self.runs[self.shape_field].dropna()]
        return list(dict.fromkeys(str(value) for value in values))

    def colour(self, frame: pd.DataFrame) -> alt.Color:
        """Colour by quantization; the legend lists the formats in `frame`, each in its fixed colour."""
        domain = [q for q in self.quantizations if q in set(frame["quantization"])]
        scale = alt.Scale(domain=domain, range=[QUANT_COLOURS.get(q, OTHER_COLOUR) for q in domain])
        return alt.Color("quantization:N", title="quantization", scale=scale)

    def _symbols(self, frame: pd.DataFrame, symbols: tuple) -> tuple[list[str], list]:
        """The method or module sets in `frame`, each with the symbol it has everywhere in the study."""
        everywhere = self.shape_values
        present = set(frame[self.shape_field].dropna().astype(str))
        domain = [value for value in everywhere if value in present]
        return domain, [symbols[everywhere.index(value) % len(symbols)] for value in domain]

    def shape(self, frame: pd.DataFrame) -> alt.Shape:
        domain, shapes = self._symbols(frame, SHAPES)
        return alt.Shape(f"{self.shape_field}:N", title=self._shape_title, scale=alt.Scale(domain=domain, range=shapes))

    def dash(self, frame: pd.DataFrame) -> alt.StrokeDash:
        domain, dashes = self._symbols(frame, DASHES)
        return alt.StrokeDash(
            f"{self.shape_field}:N", title=self._shape_title, scale=alt.Scale(domain=domain, range=dashes)
        )

    @property
    def _shape_title(self) -> str:
        return "method" if self.shape_field == "method" else "target modules"

    def with_runs(self, frame: pd.DataFrame) -> pd.DataFrame:
        """`frame` (rows keyed by run_id) with each run's style and tooltip columns it does not hold yet."""
        wanted = ["run_id", "method", "modules", "quantization", *(c for c, _, _ in RUN_TOOLTIP)]
        extra = [c for c in dict.fromkeys(wanted) if c in self.runs and (c == "run_id" or c not in frame)]
        return frame.merge(self.runs[extra], on="run_id", how="left")

    def tooltip(self, frame: pd.DataFrame, *extra: alt.Tooltip) -> list[alt.Tooltip]:
        memory = {"peak_memory_gb": self.memory_title}
        shown = [
            alt.Tooltip(f"{column}:{'Q' if fmt else 'N'}", title=memory.get(column, title), format=fmt)
            if fmt
            else alt.Tooltip(f"{column}:N", title=title)
            for column, title, fmt in RUN_TOOLTIP
            if column in frame and frame[column].notna().any()
        ]
        return [*shown, *extra]


def rank_axis(ranks: pd.Series, title: str = RANK_TITLE) -> alt.X:
    """Log2 rank axis with a tick at each swept rank and nothing else."""
    swept = sorted({int(r) for r in ranks.dropna()})
    padding = 2**0.25  # a quarter octave either side keeps the end points off the frame
    scale = alt.Scale(type="log", base=2, domain=[swept[0] / padding, swept[-1] * padding], nice=False)
    return alt.X("rank:Q", title=title, scale=scale, axis=alt.Axis(values=swept, format="d", grid=False))


def interval_bars(frame: pd.DataFrame, x: alt.X | str, metric: str, style: Style) -> alt.Chart | None:
    """Each run's 95 % interval of `metric`: its own (rows plus seed noise, own or pooled) where judged, else
    the seeds' t-interval of the mean; None without either."""
    if f"{metric}_low" in frame and frame[f"{metric}_low"].notna().any():
        bounds = frame.assign(low=frame[f"{metric}_low"], high=frame[f"{metric}_high"])
    elif f"{metric}_ci95" in frame and frame[f"{metric}_ci95"].notna().any():
        half = frame[f"{metric}_ci95"]
        bounds = frame.assign(low=frame[metric] - half, high=frame[metric] + half)
    else:
        return None
    bounds = bounds.dropna(subset=["low", "high"])
    return (
        alt.Chart(bounds)
        .mark_rule(strokeWidth=1.5)
        .encode(x=x, y=alt.Y("low:Q", title=METRIC_TITLES[metric]), y2="high:Q", color=style.colour(frame))
    )


def metric_points(frame: pd.DataFrame, x: alt.X | str, metric: str, style: Style) -> alt.LayerChart | alt.Chart:
    """Points of `metric` on an axis fitted to the points and their intervals, with interval bars."""
    points = (
        alt.Chart(frame)
        .mark_point(filled=True, size=70, opacity=1)
        .encode(
            x=x,
            y=alt.Y(f"{metric}:Q", title=METRIC_TITLES[metric], scale=alt.Scale(zero=False)),
            color=style.colour(frame),
            shape=style.shape(frame),
            tooltip=style.tooltip(frame),
        )
    )
    bars = interval_bars(frame, x, metric, style)
    return points if bars is None else alt.layer(bars, points)


def save_chart(chart: alt.Chart, out_dir: Path, stem: str) -> list[Path]:
    """HTML with the Vega libraries inlined (renders offline), SVG and PNG, as `chart.save` writes them.

    The spec is built once for the three (`chart.save` sanitises the data and validates the spec again for
    each format, most of a report's time).
    """
    # Under the data transformer altair's save builds specs with: all data inlined, large data no error.
    with alt.data_transformers.enable("default"), alt.data_transformers.disable_max_rows():
        built = _BuiltSpec(chart.to_dict(context={"pre_transform": False}))
    written = []
    for fmt in CHART_FORMATS:
        target = out_dir / f"{stem}.{fmt}"
        with atomic_path(target) as tmp:
            options = {"inline": True} if fmt == "html" else {"scale_factor": 2} if fmt == "png" else {}
            save_spec(built, str(tmp), format=fmt, vegalite_version=alt.VEGALITE_VERSION,
                      vega_version=alt.VEGA_VERSION, vegaembed_version=alt.VEGAEMBED_VERSION, **options)  # fmt: skip
        written.append(target)
    return written


@dataclass(frozen=True)
class _BuiltSpec:
    """A chart's finished spec, handed to altair's save in the chart's place (save reads only to_dict)."""

    spec: dict

    def to_dict(self, **_: object) -> dict:
        return self.spec
