"""Altair charts of the study, saved as self-contained HTML, SVG and PNG."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd

from lora_study.findings import pareto_front, prepare, trained_runs
from lora_study.io import atomic_path

CHART_FORMATS = ("html", "svg", "png")
WIDTH, HEIGHT = 360, 240


def _fitting_trained(table: pd.DataFrame) -> pd.DataFrame:
    runs = trained_runs(prepare(table))
    return runs[runs["fits"]]


def _has_spread(frame: pd.DataFrame, metric: str) -> bool:
    return any(column in frame and frame[column].notna().any() for column in (f"{metric}_low", f"{metric}_ci95"))


def _error_bars(frame: pd.DataFrame, x: str, metric: str, **encodings) -> alt.Chart:
    """Each configuration's own 95 % interval (rows resampled, plus seeds) where the table has it, else the
    seeds' 95 % t-interval of the mean."""
    if f"{metric}_low" in frame and frame[f"{metric}_low"].notna().any():
        bounds = frame.assign(low=frame[f"{metric}_low"], high=frame[f"{metric}_high"])
    else:
        half = frame[f"{metric}_ci95"]
        bounds = frame.assign(low=frame[metric] - half, high=frame[metric] + half)
    return alt.Chart(bounds).mark_errorbar().encode(x=x, y=alt.Y("low:Q", title=metric), y2="high:Q", **encodings)


def quality_vs_rank(tables: dict[str, pd.DataFrame]) -> alt.Chart | None:
    ranks = tables.get("rank")
    if ranks is None:
        return None
    rank_axis = alt.X("rank:Q", scale=alt.Scale(type="log", base=2), title="LoRA rank")
    panels = []
    for metric in (m for m in ("perplexity", "accuracy") if m in ranks):
        line = (
            alt.Chart(ranks)
            .mark_line(point=True)
            .encode(
                x=rank_axis,
                y=alt.Y(f"{metric}:Q", scale=alt.Scale(zero=False)),
                tooltip=["rank", alt.Tooltip(f"{metric}:Q", format=".4g")],
            )
        )
        if _has_spread(ranks, metric):
            line = line + _error_bars(ranks, rank_axis, metric)
        panels.append(line.properties(width=WIDTH, height=HEIGHT, title=f"{metric} vs rank"))
    return alt.hconcat(*panels)


def memory_vs_rank(tables: dict[str, pd.DataFrame], memory_title: str) -> alt.Chart | None:
    ranks = tables.get("rank")
    if ranks is None:
        return None
    return (
        alt.Chart(ranks, title="Peak memory vs rank")
        .mark_line(point=True)
        .encode(
            x=alt.X("rank:Q", scale=alt.Scale(type="log", base=2), title="LoRA rank"),
            y=alt.Y("peak_memory_gb:Q", title=memory_title, scale=alt.Scale(zero=False)),
            tooltip=["rank", alt.Tooltip("peak_memory_gb:Q", format=".3f")],
        )
        .properties(width=WIDTH, height=HEIGHT)
    )


def memory_vs_perplexity(table: pd.DataFrame, memory_title: str) -> alt.Chart | None:
    runs = _fitting_trained(table)
    if runs.empty:
        return None
    front = pareto_front(runs, "peak_memory_gb", "perplexity")
    spread = (
        _error_bars(runs, "peak_memory_gb:Q", "perplexity", color=alt.Color("quant_label:N"))
        if _has_spread(runs, "perplexity")
        else None
    )
    points = (
        alt.Chart(runs[["run_id", "peak_memory_gb", "perplexity", "quant_label"]])
        .mark_point(filled=True, size=70)
        .encode(
            x=alt.X("peak_memory_gb:Q", title=memory_title, scale=alt.Scale(zero=False)),
            y=alt.Y("perplexity:Q", scale=alt.Scale(zero=False)),
            color=alt.Color("quant_label:N", title="quantization"),
            tooltip=[
                "run_id",
                alt.Tooltip("peak_memory_gb:Q", format=".3f"),
                alt.Tooltip("perplexity:Q", format=".4g"),
            ],
        )
    )
    frontier = (
        alt.Chart(front[["run_id", "peak_memory_gb", "perplexity"]])
        .mark_line(interpolate="step-after", color="black", strokeDash=[4, 3])
        .encode(x="peak_memory_gb:Q", y="perplexity:Q")
    )
    labels = (
        alt.Chart(front[["run_id", "peak_memory_gb", "perplexity"]])
        .mark_text(align="left", dx=6, dy=-6, fontSize=10)
        .encode(x="peak_memory_gb:Q", y="perplexity:Q", text="run_id:N")
    )
    layers = points + frontier + labels + spread if spread is not None else points + frontier + labels
    return layers.properties(title="Memory vs perplexity (dashed: Pareto frontier)", width=WIDTH, height=HEIGHT)


def perplexity_by_modules(tables: dict[str, pd.DataFrame]) -> alt.Chart | None:
    modules = tables.get("modules")
    if modules is None:
        return None
    module_axis = alt.X("modules:N", sort=list(modules["modules"]), title="target modules")
    bars = (
        alt.Chart(modules)
        .mark_bar()
        .encode(
            x=module_axis,
            y=alt.Y("perplexity:Q"),
            tooltip=["modules", alt.Tooltip("perplexity:Q", format=".4g"), "trainable_params"],
        )
    )
    if _has_spread(modules, "perplexity"):
        bars = bars + _error_bars(modules, module_axis, "perplexity")
    return bars.properties(title="Perplexity by target modules", width=WIDTH, height=HEIGHT)


def quantization_comparison(tables: dict[str, pd.DataFrame], memory_title: str) -> alt.Chart | None:
    quant = tables.get("quantization")
    if quant is None:
        return None
    long = quant.melt(
        id_vars=["quantization"],
        value_vars=["perplexity", "peak_memory_gb"],
        var_name="metric",
        value_name="value",
    )
    long["metric"] = long["metric"].replace({"peak_memory_gb": memory_title})
    return (
        alt.Chart(long, title="Quantization")
        .mark_bar()
        .encode(
            x=alt.X("quantization:N", sort=list(quant["quantization"])),
            y=alt.Y("value:Q", title=None),
            tooltip=["quantization", "metric", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(width=WIDTH * 0.6, height=HEIGHT)
        .facet(column=alt.Column("metric:N", title=None))
        .resolve_scale(y="independent")
    )


def loss_curves(curves: pd.DataFrame) -> alt.Chart | None:
    if curves.empty:
        return None
    return (
        alt.Chart(curves, title="Training loss (response tokens)")
        .mark_line()
        .encode(
            x=alt.X("step:Q", title="optimizer step"),
            y=alt.Y("loss:Q", scale=alt.Scale(zero=False)),
            color=alt.Color("run_id:N", title="run"),
            tooltip=["run_id", "step", alt.Tooltip("loss:Q", format=".4f")],
        )
        .properties(width=WIDTH * 1.4, height=HEIGHT)
    )


def time_vs_memory(table: pd.DataFrame, memory_title: str) -> alt.Chart | None:
    runs = _fitting_trained(table)
    if runs.empty:
        return None
    return (
        alt.Chart(runs[["run_id", "train_wall_s", "peak_memory_gb", "quant_label"]], title="Training time vs memory")
        .mark_point(filled=True, size=70)
        .encode(
            x=alt.X("peak_memory_gb:Q", title=memory_title, scale=alt.Scale(zero=False)),
            y=alt.Y("train_wall_s:Q", title="training wall time (s)", scale=alt.Scale(zero=False)),
            color=alt.Color("quant_label:N", title="quantization"),
            tooltip=[
                "run_id",
                alt.Tooltip("train_wall_s:Q", format=".1f"),
                alt.Tooltip("peak_memory_gb:Q", format=".3f"),
            ],
        )
        .properties(width=WIDTH, height=HEIGHT)
    )


def matrix_heatmaps(tables: dict[str, pd.DataFrame]) -> dict[str, alt.Chart]:
    """A heatmap of perplexity per two-axis matrix (one cell per run), the value written in each cell."""
    charts = {}
    for matrix in tables.values():
        if "cells" not in matrix.attrs:
            continue
        first, second = matrix.attrs["axes"]
        cells = matrix.attrs["cells"].dropna(subset=["perplexity"]).copy()
        cells[first], cells[second] = cells[first].astype(str), cells[second].astype(str)
        base = alt.Chart(cells).encode(
            x=alt.X(f"{second}:O", title=second, sort=None),
            y=alt.Y(f"{first}:O", title=first, sort=None),
        )
        heat = base.mark_rect().encode(
            color=alt.Color("perplexity:Q", scale=alt.Scale(scheme="viridis", reverse=True)),
            tooltip=["run_id", first, second, alt.Tooltip("perplexity:Q", format=".4g")],
        )
        # Light text on the dark (high-perplexity) end of the scale, dark text elsewhere.
        middle = (cells["perplexity"].min() + cells["perplexity"].max()) / 2
        text = base.mark_text(fontSize=11).encode(
            text=alt.Text("perplexity:Q", format=".3g"),
            color=alt.condition(alt.datum.perplexity > middle, alt.value("white"), alt.value("black")),
        )
        title = f"perplexity: {first} x {second}"
        charts[f"heatmap_{first}_x_{second}"] = (heat + text).properties(width=WIDTH, height=HEIGHT, title=title)
    return charts


def effective_rank_chart(tables: dict[str, pd.DataFrame]) -> alt.Chart | None:
    """Effective rank per module group against the adapter's rank, with the line where all of it is used."""
    anatomy = tables.get("anatomy")
    if anatomy is None:
        return None
    adapters = anatomy.dropna(subset=["rank"])
    if adapters["rank"].nunique() < 2:
        return None
    axis = alt.X("rank:Q", scale=alt.Scale(type="log", base=2), title="adapter rank")
    points = (
        alt.Chart(adapters)
        .mark_point(filled=True)
        .encode(
            x=axis,
            y=alt.Y("effective_rank:Q", title="effective rank (90% energy)"),
            color="group:N",
            tooltip=["run_id", "group", alt.Tooltip("effective_rank:Q", format=".3g"), "rank_use"],
        )
    )
    ranks = pd.DataFrame({"rank": sorted(adapters["rank"].unique())})
    full_use = alt.Chart(ranks).mark_line(strokeDash=[4, 4], color="gray").encode(x=axis, y="rank:Q")
    return (points + full_use).properties(width=WIDTH, height=HEIGHT, title="rank used by the updates")


def downstream_chart(tables: dict[str, pd.DataFrame]) -> alt.Chart | None:
    """Each run's lm-eval score per task with lm-eval's standard error (± 1.96 se)."""
    scores = tables.get("downstream")
    if scores is None or scores.empty:
        return None
    se = scores["stderr"].fillna(0)
    frame = scores.assign(low=scores["score"] - 1.96 * se, high=scores["score"] + 1.96 * se,
                          vs_base=scores["vs_base"].fillna("").replace("", "base model"))  # fmt: skip
    y = alt.Y("run_id:N", sort=list(dict.fromkeys(frame["run_id"])), title=None)
    tooltip = ["run_id", "task", "metric", alt.Tooltip("score:Q", format=".3f"),
               alt.Tooltip("stderr:Q", format=".3f"), "documents", "vs_base"]  # fmt: skip
    points = (
        alt.Chart(frame)
        .mark_point(filled=True)
        .encode(
            x=alt.X("score:Q", title="score (lm-eval)", scale=alt.Scale(zero=False)),
            y=y,
            color=alt.Color("vs_base:N", title="against base"),
            tooltip=tooltip,
        )
    )
    bars = alt.Chart(frame).mark_errorbar().encode(x=alt.X("low:Q", title="score (lm-eval)"), x2="high:Q", y=y)
    return (
        (bars + points)
        .properties(width=WIDTH, height=alt.Step(14))
        .facet(column=alt.Column("task:N", title=None))
        .properties(title="downstream scores (95% interval from lm-eval's standard error)")
    )


def serving_chart(tables: dict[str, pd.DataFrame]) -> alt.Chart | None:
    """What each configuration costs to serve: ms per generated token at batch 1, by deployed form."""
    serving = tables.get("serving")
    if serving is None or serving.empty:
        return None
    batch_columns = sorted(c for c in serving if c.startswith("tokens_per_s_b") and c != "tokens_per_s_b1")
    tooltip = ["run_id", "form", alt.Tooltip("ms_per_token_b1:Q", format=".3g"),
               alt.Tooltip("ttft_ms_b1:Q", format=".3g"), alt.Tooltip("tokens_per_s_b1:Q", format=".4g"),
               *[alt.Tooltip(f"{c}:Q", format=".4g") for c in batch_columns],
               alt.Tooltip("peak_memory_gb:Q", format=".3g")]  # fmt: skip
    return (
        alt.Chart(serving)
        .mark_bar()
        .encode(
            x=alt.X("ms_per_token_b1:Q", title="ms per generated token (batch 1, after the first)"),
            y=alt.Y("run_id:N", sort=list(dict.fromkeys(serving["run_id"])), title=None),
            yOffset="form:N",
            color=alt.Color("form:N", title="deployed as"),
            tooltip=tooltip,
        )
        .properties(width=WIDTH, title="what each configuration costs to serve")
    )


def build_charts(
    table: pd.DataFrame, tables: dict[str, pd.DataFrame], curves: pd.DataFrame, memory_title: str
) -> dict[str, alt.Chart]:
    """Every chart the study's axes support, by file stem."""
    charts = {
        "quality_vs_rank": quality_vs_rank(tables),
        "memory_vs_rank": memory_vs_rank(tables, memory_title),
        "memory_vs_perplexity": memory_vs_perplexity(table, memory_title),
        "perplexity_by_modules": perplexity_by_modules(tables),
        "quantization": quantization_comparison(tables, memory_title),
        "loss_curves": loss_curves(curves),
        "time_vs_memory": time_vs_memory(table, memory_title),
        "effective_rank": effective_rank_chart(tables),
        "downstream": downstream_chart(tables),
        "serving": serving_chart(tables),
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
