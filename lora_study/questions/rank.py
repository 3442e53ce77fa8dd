"""Rank sweep: quality and memory per LoRA rank, and the sweet-spot rank."""

from __future__ import annotations

import altair as alt
import pandas as pd

from lora_study.analysis.runs import (
    with_own_intervals,
)
from lora_study.questions.common import (
    add_noise,
    measured,
    sig,
    status_column,
    sweep_slice,
    unjudged,
    with_accuracy,
)
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.report.style import HEIGHT, METRIC_TITLES, WIDTH, Style, metric_points, rank_axis
from lora_study.stats.verdicts import (
    Judge,
    Verdict,
    against_best,
)


def rank_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    group = sweep_slice(runs, "rank", ["modules_label", "quant_label", "alpha_rule"])
    if group is None:
        return None
    group = group.sort_values("rank")
    table = pd.DataFrame(
        {
            "run_id": group["run_id"],
            "rank": group["rank"],
            "modules": group["modules_label"],
            "quantization": group["quant_label"],
            **measured(group, "perplexity", "accuracy", "peak_memory_gb", "train_wall_s"),
            "quality_per_gb": (group["base_perplexity"] - group["perplexity"]) / group["peak_memory_gb"],
            "status": status_column(group),
        }
    )
    table = add_noise(table, group)
    return table[with_accuracy(list(table.columns), table)].reset_index(drop=True)


def sweet_spot_finding(
    ranks: pd.DataFrame | None, judge: Judge, settings: FindingSettings, memory_text: str = "peak memory"
) -> str | None:
    """The smallest rank equivalent to the best rank, every smaller rank shown worse; else inconclusive."""
    if ranks is None:
        return None
    fitting = ranks.dropna(subset=["perplexity"]).sort_values("rank")
    if fitting.empty:
        return None
    best = fitting.loc[fitting["perplexity"].idxmin()]
    smaller = fitting[fitting["rank"] < best["rank"]]
    tolerance = f"tolerance {settings.sweet_spot_tolerance:.0%}"
    if smaller.empty:
        return (f"Sweet-spot rank: {int(best['rank'])}, the smallest rank tried, is also the best "
                f"(perplexity {sig(best['perplexity'])}; {_sweep(fitting)}).")  # fmt: skip
    worse, sources = [], ""
    for _, row in smaller.iterrows():
        # The best rank was picked from the data: every pair of the ranks tried is a comparison it could show.
        result = judge.compare(row["run_id"], best["run_id"], "perplexity", settings.sweet_spot_tolerance,
                               against_best(len(fitting)))  # fmt: skip
        if result is None:
            return unjudged("Sweet-spot rank")
        if result.verdict is Verdict.EQUIVALENT:
            shown = f"; smaller ranks are worse ({'; '.join(worse)})" if worse else ""
            ratio = row["peak_memory_gb"] / best["peak_memory_gb"]
            return (
                f"Sweet-spot rank: {int(row['rank'])} (perplexity {sig(row['perplexity'])}) is equivalent to the "
                f"best rank {int(best['rank'])} ({sig(best['perplexity'])}) within the {tolerance}: "
                f"{result.describe()}, at {ratio:.0%} of its peak memory ({memory_text}){shown}."
            )
        if result.verdict is not Verdict.WORSE:
            return (
                f"Sweet-spot rank: inconclusive. Rank {int(row['rank'])} against the best rank "
                f"{int(best['rank'])} is {result.describe()}."
            )
        worse.append(f"{int(row['rank'])}: {result.interval_text()}")
        sources = result.sources
    m = against_best(len(fitting))
    counted = f"{m} comparisons (best of {len(fitting)} ranks)" if m > 1 else "1 comparison"
    return (
        f"Sweet-spot rank: {int(best['rank'])}, the best rank (perplexity {sig(best['perplexity'])}); every "
        f"smaller rank is worse ({'; '.join(worse)}; {tolerance}, {counted}, {sources})."
    )


def _sweep(ranks: pd.DataFrame) -> str:
    return "ranks " + ", ".join(str(int(r)) for r in ranks["rank"])


def quality_vs_rank(tables: dict[str, pd.DataFrame], style: Style) -> alt.Chart | None:
    ranks = tables.get("rank")
    if ranks is None:
        return None
    frame = style.with_runs(ranks)
    axis = rank_axis(frame["rank"])
    panels = []
    for metric in (m for m in METRIC_TITLES if m in frame and frame[m].notna().any()):
        line = alt.Chart(frame).mark_line(color="#bbbbbb").encode(x=axis, y=f"{metric}:Q")
        title = f"{metric.capitalize()} vs LoRA rank"
        panels.append(alt.layer(line, metric_points(frame, axis, metric, style)).properties(
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


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    ranks = rank_table(study.runs)
    return {"rank": with_own_intervals(ranks, study.judge) if ranks is not None else None}


def findings(study: Study) -> list[str | None]:
    return [sweet_spot_finding(study.tables.get("rank"), study.judge, study.settings, study.memory_short)]


def charts(study: Study, style: Style) -> dict[str, alt.Chart | None]:
    return {
        "quality_vs_rank": quality_vs_rank(study.tables, style),
        "memory_vs_rank": memory_vs_rank(study.tables, style),
    }


QUESTION = Question(
    anchor="rank",
    title="Rank: quality and memory",
    tables=tables,
    findings=findings,
    charts=charts,
    captions={
        "quality_vs_rank": "Perplexity and accuracy of the rank sweep, each with its own 95 % interval (where the "
        "configuration is); a tick at every swept rank. Whether two ranks differ is the comparisons chart's question.",
        "memory_vs_rank": "Peak memory of each rank of the sweep (bars from zero: what rank adds is small against "
        "the base).",
    },
    titles={
        "rank": "Rank sweep",
    },
    definitions={
        "sweet_spot": "the smallest rank of the rank sweep whose perplexity is *equivalent* to the best rank's "
        "(tolerance sweet_spot_tolerance = {sweet_spot_tolerance:.0%}), every smaller rank being *worse*; "
        "otherwise the sentence says the comparison is inconclusive. The best rank is picked from the data, so m = "
        "k(k-1)/2, every pair of the k ranks tried (simultaneous intervals over them).",
        "quality_per_gb": "(perplexity of the base model in the run's weight format - perplexity of the run) / "
        "peak memory in GB: perplexity reduction bought per GB.",
    },
)
