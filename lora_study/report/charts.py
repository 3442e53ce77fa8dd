"""Altair charts of the study, saved as self-contained HTML, SVG and PNG.

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

from lora_study.core.io import atomic_path
from lora_study.questions.axes import MATRIX_PREFIX
from lora_study.questions.findings import measured_device, pareto_front, trained_runs
from lora_study.report.captions import HEATMAP_PREFIX
from lora_study.training.planner import MEMORY_TERMS, OVERHEAD_TERMS, memory_terms

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
# The memory chart's terms get their own palette: its colours mean terms, not formats.
TERM_COLOURS = ("#3b3b98", "#7f7fd5", "#c9a227", "#6a9a58", "#b7d6a3", "#d98c5f", "#bdbdbd")

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


def heatmap_name(table_name: str) -> str:
    """The chart of a two-axis matrix table (matrix__rank__learning_rate -> heatmap__rank__learning_rate)."""
    return HEATMAP_PREFIX + table_name.removeprefix(MATRIX_PREFIX)


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


def _rank_axis(ranks: pd.Series, title: str = RANK_TITLE) -> alt.X:
    """Log2 rank axis with a tick at each swept rank and nothing else."""
    swept = sorted({int(r) for r in ranks.dropna()})
    padding = 2**0.25  # a quarter octave either side keeps the end points off the frame
    scale = alt.Scale(type="log", base=2, domain=[swept[0] / padding, swept[-1] * padding], nice=False)
    return alt.X("rank:Q", title=title, scale=scale, axis=alt.Axis(values=swept, format="d", grid=False))


def _interval_bars(frame: pd.DataFrame, x: alt.X | str, metric: str, style: Style) -> alt.Chart | None:
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


def _metric_points(frame: pd.DataFrame, x: alt.X | str, metric: str, style: Style) -> alt.LayerChart | alt.Chart:
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
    bars = _interval_bars(frame, x, metric, style)
    return points if bars is None else alt.layer(bars, points)


def quality_vs_rank(tables: dict[str, pd.DataFrame], style: Style) -> alt.Chart | None:
    ranks = tables.get("rank")
    if ranks is None:
        return None
    frame = style.with_runs(ranks)
    axis = _rank_axis(frame["rank"])
    panels = []
    for metric in (m for m in METRIC_TITLES if m in frame and frame[m].notna().any()):
        line = alt.Chart(frame).mark_line(color="#bbbbbb").encode(x=axis, y=f"{metric}:Q")
        title = f"{metric.capitalize()} vs LoRA rank"
        panels.append(alt.layer(line, _metric_points(frame, axis, metric, style)).properties(
            width=WIDTH, height=HEIGHT, title=title))  # fmt: skip
    return alt.hconcat(*panels)


def memory_vs_rank(tables: dict[str, pd.DataFrame], style: Style) -> alt.Chart | None:
    ranks = tables.get("rank")
    if ranks is None:
        return None
    frame = style.with_runs(ranks)
    return (
        alt.Chart(frame, title="Peak memory vs LoRA rank")
        .mark_bar()
        .encode(
            x=alt.X("rank:O", title="LoRA rank", sort=sorted(frame["rank"].unique()), axis=alt.Axis(labelAngle=0)),
            y=alt.Y("peak_memory_gb:Q", title=style.memory_title),
            color=style.colour(frame),
            tooltip=style.tooltip(frame),
        )
        .properties(width=WIDTH, height=HEIGHT)
    )


def _fitting_trained(style: Style) -> pd.DataFrame:
    runs = trained_runs(style.runs)
    return runs[runs["fits"]]


def memory_vs_perplexity(style: Style) -> alt.Chart | None:
    runs = _fitting_trained(style).dropna(subset=["peak_memory_gb", "perplexity"])
    if runs.empty:
        return None
    front = pareto_front(runs, "peak_memory_gb", "perplexity")
    x = alt.X("peak_memory_gb:Q", title=style.memory_title, scale=alt.Scale(zero=False))
    frontier = (
        alt.Chart(front)
        .mark_line(interpolate="step-after", color="black", strokeDash=[4, 3])
        .encode(x=x, y="perplexity:Q")
    )
    # Frontier points sit close together: their labels step through three heights so neighbours do not overlap.
    labels = [
        alt.Chart(front.iloc[start::3])
        .mark_text(align="left", dx=7, dy=dy, fontSize=10)
        .encode(x=x, y="perplexity:Q", text="run_id:N")
        for start, dy in enumerate((-10, 14, -24))
    ]
    return alt.layer(frontier, _metric_points(runs, x, "perplexity", style), *labels).properties(
        title="Peak memory vs perplexity (dashed: Pareto frontier)", width=WIDTH, height=HEIGHT
    )


def perplexity_by_modules(tables: dict[str, pd.DataFrame], style: Style) -> alt.Chart | None:
    modules = tables.get("modules")
    if modules is None:
        return None
    frame = style.with_runs(modules)
    order = list(modules["modules"])
    x = alt.X("modules:N", sort=order, title="target modules", axis=alt.Axis(labelAngle=0))
    quality = _metric_points(frame, x, "perplexity", style).properties(
        width=WIDTH * 0.75, height=HEIGHT, title="Perplexity by target modules"
    )
    params = (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=x,
            y=alt.Y("trainable_params:Q", title="trainable parameters"),
            color=style.colour(frame),
            tooltip=style.tooltip(frame),
        )
        .properties(width=WIDTH * 0.75, height=HEIGHT, title="Trainable parameters by target modules")
    )
    return alt.hconcat(quality, params)


def quantization_comparison(tables: dict[str, pd.DataFrame], style: Style) -> alt.Chart | None:
    quant = tables.get("quantization")
    if quant is None:
        return None
    frame = style.with_runs(quant)
    x = alt.X("quantization:N", sort=list(quant["quantization"]), title="quantization", axis=alt.Axis(labelAngle=0))
    quality = _metric_points(frame, x, "perplexity", style).properties(
        width=WIDTH * 0.6, height=HEIGHT, title="Perplexity by quantization"
    )
    memory = (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=x,
            y=alt.Y("peak_memory_gb:Q", title=style.memory_title),
            color=style.colour(frame),
            tooltip=style.tooltip(frame),
        )
        .properties(width=WIDTH * 0.6, height=HEIGHT, title="Peak memory by quantization")
    )
    return alt.hconcat(quality, memory)


def loss_curves(curves: pd.DataFrame, style: Style) -> alt.Chart | None:
    if curves.empty:
        return None
    frame = style.with_runs(curves[["run_id", "step", "loss"]])
    return (
        alt.Chart(frame, title="Training loss per optimizer step")
        .mark_line(strokeWidth=1.5)
        .encode(
            x=alt.X("step:Q", title="optimizer step"),
            y=alt.Y("loss:Q", title="training loss (response tokens, nats)", scale=alt.Scale(zero=False)),
            color=style.colour(frame),
            strokeDash=style.dash(frame),
            detail="run_id:N",
            tooltip=[
                alt.Tooltip("run_id:N", title="run"),
                "step:Q",
                alt.Tooltip("loss:Q", format=".4f"),
                *style.tooltip(frame)[1:],
            ],
        )
        .properties(width=WIDTH * 1.4, height=HEIGHT)
    )


def time_vs_memory(style: Style) -> alt.Chart | None:
    runs = _fitting_trained(style).dropna(subset=["peak_memory_gb", "train_wall_s"])
    if runs.empty:
        return None
    return (
        alt.Chart(runs, title="Training time vs peak memory")
        .mark_point(filled=True, size=70, opacity=1)
        .encode(
            x=alt.X("peak_memory_gb:Q", title=style.memory_title, scale=alt.Scale(zero=False)),
            y=alt.Y("train_wall_s:Q", title="training time (s, sum of optimizer steps)", scale=alt.Scale(zero=False)),
            color=style.colour(runs),
            shape=style.shape(runs),
            tooltip=style.tooltip(runs),
        )
        .properties(width=WIDTH, height=HEIGHT)
    )


def memory_breakdown(style: Style) -> alt.Chart | None:
    """Each trained run's predicted peak as stacked planner terms, its measured peak as a black tick."""
    runs = trained_runs(style.runs)
    plan_columns = [f"plan_{column}" for column in MEMORY_TERMS.values()]
    if any(column not in runs for column in plan_columns):
        return None
    runs = runs.dropna(subset=[*plan_columns, "plan_predicted_cuda_allocated_gb"])
    if runs.empty:
        return None
    rows = []
    for _, run in runs.iterrows():
        device = measured_device(run.get("memory_kind"))
        plan = {k.removeprefix("plan_"): v for k, v in run.items() if str(k).startswith("plan_")}
        for term, gb in memory_terms(plan, device).items():
            rows.append({"run_id": run["run_id"], "term": term, "gb": gb, "device": device})
    terms = pd.DataFrame(rows)
    term_order = [*MEMORY_TERMS, *(t for t in OVERHEAD_TERMS.values() if t in set(terms["term"]))]
    order = list(runs.sort_values("peak_memory_gb", na_position="last")["run_id"])
    y = alt.Y("run_id:N", sort=order, title="run")
    bars = (
        alt.Chart(terms)
        .transform_calculate(term_index=f"indexof({term_order!r}, datum.term)")
        .mark_bar()
        .encode(
            x=alt.X("gb:Q", title=style.memory_title, stack="zero"),
            y=y,
            color=alt.Color(
                "term:N",
                title="planned term",
                sort=term_order,
                scale=alt.Scale(domain=term_order, range=list(TERM_COLOURS)),
            ),
            order=alt.Order("term_index:Q"),
            tooltip=[
                alt.Tooltip("run_id:N", title="run"),
                alt.Tooltip("term:N", title="term"),
                alt.Tooltip("gb:Q", title="predicted (GB)", format=".3f"),
                alt.Tooltip("device:N", title="planned for"),
            ],
        )
    )
    measured = runs.dropna(subset=["peak_memory_gb"])
    peak = (
        alt.Chart(measured)
        .mark_tick(color="black", thickness=3, size=16)
        .encode(x=alt.X("peak_memory_gb:Q", title=style.memory_title), y=y, tooltip=style.tooltip(measured))
    )
    return alt.layer(bars, peak).properties(
        width=WIDTH * 1.4, height=alt.Step(20), title="Where the memory goes: planned terms vs measured peak"
    )


def matrix_heatmaps(tables: dict[str, pd.DataFrame]) -> dict[str, alt.Chart]:
    """A heatmap of perplexity per two-axis matrix (one cell per run), the value written in each cell."""
    charts = {}
    for name, matrix in tables.items():
        if "cells" not in matrix.attrs:
            continue
        first, second = matrix.attrs["axes"]
        cells = matrix.attrs["cells"].dropna(subset=["perplexity"]).copy()
        cells[first], cells[second] = cells[first].astype(str), cells[second].astype(str)
        base = alt.Chart(cells).encode(
            x=alt.X(f"{second}:O", title=second.replace("_", " "), sort=None, axis=alt.Axis(labelAngle=0)),
            y=alt.Y(f"{first}:O", title=first.replace("_", " "), sort=None),
        )
        heat = base.mark_rect().encode(
            color=alt.Color("perplexity:Q", title="perplexity", scale=alt.Scale(scheme="viridis", reverse=True)),
            tooltip=["run_id", first, second, alt.Tooltip("perplexity:Q", format=".4g")],
        )
        # Light text on the dark (high-perplexity) end of the scale, dark text elsewhere.
        middle = (cells["perplexity"].min() + cells["perplexity"].max()) / 2
        text = base.mark_text(fontSize=11).encode(
            text=alt.Text("perplexity:Q", format=".3g"),
            color=alt.condition(alt.datum.perplexity > middle, alt.value("white"), alt.value("black")),
        )
        title = f"Perplexity: {first} x {second}"
        charts[heatmap_name(name)] = (heat + text).properties(width=WIDTH, height=HEIGHT, title=title)
    return charts


def effective_rank_chart(tables: dict[str, pd.DataFrame], style: Style) -> alt.Chart | None:
    """Effective rank per module group against the adapter's rank, with the line where all of it is used."""
    anatomy = tables.get("anatomy")
    if anatomy is None:
        return None
    adapters = anatomy.dropna(subset=["rank"])
    if adapters["rank"].nunique() < 2:
        return None
    frame = style.with_runs(adapters)
    axis = _rank_axis(frame["rank"], title="adapter rank (log scale)")
    points = (
        alt.Chart()
        .mark_point(filled=True, size=60, opacity=1)
        .encode(
            x=axis,
            y=alt.Y("effective_rank:Q", title="effective rank (90% energy)"),
            color=style.colour(frame),
            shape=style.shape(frame),
            tooltip=[*style.tooltip(frame), "group:N", alt.Tooltip("effective_rank:Q", format=".3g"), "rank_use:Q"],
        )
    )
    full_use = alt.Chart().mark_line(strokeDash=[4, 4], color="gray").encode(x=axis, y="rank:Q")
    return (
        alt.layer(full_use, points, data=frame)
        .properties(width=WIDTH * 0.5, height=HEIGHT)
        .facet(column=alt.Column("group:N", title="module group"))
        .properties(title="Rank used by the updates, per module group")
    )


def downstream_chart(tables: dict[str, pd.DataFrame], style: Style) -> alt.Chart | None:
    """Each run's lm-eval score per task with lm-eval's standard error (± 1.96 se)."""
    scores = tables.get("downstream")
    if scores is None or scores.empty:
        return None
    se = scores["stderr"].fillna(0)
    frame = style.with_runs(scores.assign(low=scores["score"] - 1.96 * se, high=scores["score"] + 1.96 * se,
                                          vs_base=scores["vs_base"].fillna("").replace("", "base model")))  # fmt: skip
    y = alt.Y("run_id:N", sort=list(dict.fromkeys(frame["run_id"])), title="run")
    x_title = "score (lm-eval metric, 95% interval)"
    tooltip = [*style.tooltip(frame), "task:N", "metric:N", alt.Tooltip("score:Q", format=".3f"),
               alt.Tooltip("stderr:Q", format=".3f"), "documents:Q",
               alt.Tooltip("vs_base:N", title="vs base")]  # fmt: skip
    points = (
        alt.Chart()
        .mark_point(filled=True, size=60, opacity=1)
        .encode(
            x=alt.X("score:Q", title=x_title, scale=alt.Scale(zero=False)),
            y=y,
            color=style.colour(frame),
            shape=style.shape(frame),
            tooltip=tooltip,
        )
    )
    bars = alt.Chart().mark_rule().encode(x=alt.X("low:Q", title=x_title), x2="high:Q", y=y, color=style.colour(frame))
    return (
        alt.layer(bars, points, data=frame)
        .properties(width=WIDTH * 0.75, height=alt.Step(14))
        .facet(column=alt.Column("task:N", title="lm-eval task"))
        .resolve_scale(x="independent")
        .properties(title="Downstream scores (95% interval from lm-eval's standard error)")
    )


def serving_chart(tables: dict[str, pd.DataFrame], style: Style) -> alt.Chart | None:
    """What each configuration costs to serve: ms per generated token at batch 1, by deployed form."""
    serving = tables.get("serving")
    if serving is None or serving.empty:
        return None
    frame = style.with_runs(serving)
    forms = list(dict.fromkeys(frame["form"]))
    batch_columns = sorted(c for c in frame if c.startswith("tokens_per_s_b") and c != "tokens_per_s_b1")
    tooltip = [*style.tooltip(frame), alt.Tooltip("form:N", title="deployed as"),
               alt.Tooltip("ms_per_token_b1:Q", format=".3g"), alt.Tooltip("ttft_ms_b1:Q", format=".3g"),
               alt.Tooltip("tokens_per_s_b1:Q", format=".4g"),
               *[alt.Tooltip(f"{c}:Q", format=".4g") for c in batch_columns]]  # fmt: skip
    opacity = alt.Scale(domain=forms, range=[1.0 - 0.6 * i / max(len(forms) - 1, 1) for i in range(len(forms))])
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("ms_per_token_b1:Q", title="ms per generated token (batch 1, after the first)"),
            y=alt.Y("run_id:N", sort=list(dict.fromkeys(frame["run_id"])), title="run"),
            yOffset=alt.YOffset("form:N", sort=forms),
            color=style.colour(frame),
            opacity=alt.Opacity("form:N", title="deployed as", sort=forms, scale=opacity),
            tooltip=tooltip,
        )
        .properties(width=WIDTH, title="What each configuration costs to serve")
    )


VERDICT_COLOURS = {"better": "#54a24b", "worse": "#e45756", "equivalent": "#4c78a8", "inconclusive": "#999999"}


def comparison_chart(tables: dict[str, pd.DataFrame]) -> alt.Chart | None:
    """Each perplexity verdict's change against its reference with the interval it rests on, over the
    tolerance band of its sentence: what the verdicts say, beside the per-configuration error bars."""
    comparisons = tables.get("comparisons")
    if comparisons is None or comparisons.empty:
        return None
    frame = comparisons[comparisons["metric"] == "perplexity"].copy()
    if frame.empty:
        return None
    frame["pair"] = frame["candidate"] + " vs " + frame["reference"]
    frame = frame.drop_duplicates("pair")  # the first sentence's comparison of a pair
    frame["tolerance_low"] = -frame["tolerance_pct"]
    order = list(frame["pair"])
    y = alt.Y("pair:N", title="candidate vs reference", sort=order)
    x_title = "perplexity change against the reference (%), interval the verdict rests on"
    band = alt.Chart(frame).mark_bar(color="#dddddd", height=12).encode(
        x=alt.X("tolerance_low:Q", title=x_title), x2="tolerance_pct:Q", y=y)  # fmt: skip
    zero = alt.Chart(pd.DataFrame({"x": [0.0]})).mark_rule(color="#666666", strokeDash=[4, 3]).encode(x="x:Q")
    colour = alt.Color("verdict:N", scale=alt.Scale(domain=list(VERDICT_COLOURS), range=list(VERDICT_COLOURS.values())))
    tooltip = [alt.Tooltip("candidate:N"), alt.Tooltip("reference:N"), alt.Tooltip("verdict:N"),
               alt.Tooltip("change_pct:Q", title="change (%)", format="+.1f"),
               alt.Tooltip("low_pct:Q", title="low (%)", format="+.1f"),
               alt.Tooltip("high_pct:Q", title="high (%)", format="+.1f"),
               alt.Tooltip("tolerance_pct:Q", title="tolerance (%)", format=".0f"),
               alt.Tooltip("comparisons:Q", title="comparisons (m)"), alt.Tooltip("noise:N")]  # fmt: skip
    rules = alt.Chart(frame).mark_rule(strokeWidth=2).encode(x="low_pct:Q", x2="high_pct:Q", y=y, color=colour)
    points = alt.Chart(frame).mark_point(filled=True, size=60).encode(x="change_pct:Q", y=y, color=colour,
                                                                      tooltip=tooltip)  # fmt: skip
    height = max(HEIGHT // 2, 18 * len(frame))
    return alt.layer(band, zero, rules, points).properties(width=WIDTH, height=height,
                                                           title="Verdicts: change against the reference")  # fmt: skip


def build_charts(
    runs: pd.DataFrame, tables: dict[str, pd.DataFrame], curves: pd.DataFrame, memory_title: str
) -> dict[str, alt.Chart]:
    """Every chart the study's axes support, by file stem.

    `runs`: the prepared runs table (lora_study.questions.findings.prepare) with each run's own 95 % intervals.
    """
    style = Style.of(runs, memory_title)
    charts = {
        "quality_vs_rank": quality_vs_rank(tables, style),
        "memory_vs_rank": memory_vs_rank(tables, style),
        "memory_vs_perplexity": memory_vs_perplexity(style),
        "perplexity_by_modules": perplexity_by_modules(tables, style),
        "quantization": quantization_comparison(tables, style),
        "loss_curves": loss_curves(curves, style),
        "time_vs_memory": time_vs_memory(style),
        "memory_breakdown": memory_breakdown(style),
        "effective_rank": effective_rank_chart(tables, style),
        "downstream": downstream_chart(tables, style),
        "serving": serving_chart(tables, style),
        "comparisons": comparison_chart(tables),
        **matrix_heatmaps(tables),
    }
    return {name: chart for name, chart in charts.items() if chart is not None}


def save_chart(chart: alt.Chart, out_dir: Path, stem: str) -> list[Path]:
    """HTML with the Vega libraries inlined (renders offline), SVG and PNG."""
    written = []
    for fmt in CHART_FORMATS:
        target = out_dir / f"{stem}.{fmt}"
        with atomic_path(target) as tmp:
            if fmt == "html":
                chart.save(str(tmp), format="html", inline=True)
            elif fmt == "png":
                chart.save(str(tmp), format="png", scale_factor=2)
            else:
                chart.save(str(tmp), format=fmt)
        written.append(target)
    return written
