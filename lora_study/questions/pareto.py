"""The Pareto set: the runs no other run beats on both peak memory (or training time) and perplexity."""

from __future__ import annotations

import altair as alt
import pandas as pd

from lora_study.analysis.runs import (
    trained_runs,
)
from lora_study.questions.common import (
    measured,
    sig,
    status_column,
    with_accuracy,
)
from lora_study.report.question import Question, Study
from lora_study.report.style import HEIGHT, WIDTH, Style, metric_points


def time_memory_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    trained = trained_runs(runs)
    if trained.empty:
        return None
    return pd.DataFrame(
        {
            "run_id": trained["run_id"],
            **measured(trained, "train_wall_s", "peak_memory_gb"),
            "time_per_gb": (trained["train_wall_s"] / trained["peak_memory_gb"]).where(trained["fits"]),
            **measured(trained, "train_tokens_per_s"),
            "status": status_column(trained),
        }
    ).reset_index(drop=True)


def pareto_front(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows not dominated on (x, y), both minimised; equal points are all kept."""
    points = frame.dropna(subset=[x, y])
    keep = []
    for _, row in points.iterrows():
        no_worse = (points[x] <= row[x]) & (points[y] <= row[y])
        better = (points[x] < row[x]) | (points[y] < row[y])
        keep.append(not (no_worse & better).any())
    return points[keep].sort_values([x, y])


def pareto_table(runs: pd.DataFrame, x: str) -> pd.DataFrame | None:
    trained = trained_runs(runs)
    trained = trained[trained["fits"]]
    if trained.empty:
        return None
    front = pareto_front(trained, x, "perplexity")
    columns = with_accuracy(["run_id", x, "perplexity", "accuracy", "trainable_params"], front)
    return front[columns].reset_index(drop=True)


def pareto_finding(front: pd.DataFrame | None, x: str, axis_name: str, unit: str) -> str | None:
    if front is None or front.empty:
        return None
    listed = "; ".join(
        f"{r['run_id']} ({r[x]:.3g} {unit}, perplexity {sig(r['perplexity'])})" for _, r in front.iterrows()
    )
    return f"Pareto-optimal on {axis_name} and perplexity ({len(front)} run{'s' if len(front) != 1 else ''}): {listed}."


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
    return alt.layer(frontier, metric_points(runs, x, "perplexity", style), *labels).properties(
        title="Peak memory vs perplexity (dashed: Pareto frontier)", width=WIDTH, height=HEIGHT
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


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return {
        "pareto_memory": pareto_table(study.runs, "peak_memory_gb"),
        "time_memory": time_memory_table(study.runs),
        "pareto_time": pareto_table(study.runs, "train_wall_s"),
    }


def findings(study: Study) -> list[str | None]:
    return [
        pareto_finding(
            study.tables.get("pareto_memory"), "peak_memory_gb", f"peak memory ({study.memory_short})", "GB"
        ),
        pareto_finding(study.tables.get("pareto_time"), "train_wall_s", "training time", "s"),
    ]


def charts(study: Study, style: Style) -> dict[str, alt.Chart | None]:
    return {"memory_vs_perplexity": memory_vs_perplexity(style), "time_vs_memory": time_vs_memory(style)}


QUESTION = Question(
    anchor="pareto",
    title="Pareto set: memory, time and perplexity",
    tables=tables,
    findings=findings,
    charts=charts,
    captions={
        "memory_vs_perplexity": "Every fitting run by peak memory and perplexity (95 % intervals); the dashed line "
        "is the Pareto frontier and only its points are labelled.",
        "time_vs_memory": "Training time (sum of the optimizer steps) against peak memory per run.",
    },
    titles={
        "pareto_memory": "Pareto set: peak memory vs perplexity",
        "time_memory": "Time and memory",
        "pareto_time": "Pareto set: training time vs perplexity",
    },
    definitions={
        "pareto": "a run is Pareto-optimal when no other run is at least as good on both axes and "
        "strictly better on one (lower is better on both).",
        "time_per_gb": "training wall time in seconds / peak memory in GB.",
    },
)
