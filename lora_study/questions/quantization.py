"""Quantization: each weight format's quality and memory at the same rank and modules."""

from __future__ import annotations

import altair as alt
import pandas as pd

from lora_study.analysis.runs import (
    with_own_intervals,
)
from lora_study.core.formats import UNQUANTIZED
from lora_study.questions.common import (
    add_noise,
    dtype_columns,
    measured,
    reference_row,
    sig,
    status_column,
    sweep_slice,
    with_accuracy,
)
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.report.style import HEIGHT, WIDTH, Style, metric_points
from lora_study.stats.verdicts import (
    Judge,
    against_best,
)


def quantization_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    group = sweep_slice(runs, "quant_label", ["rank", "alpha", "modules_label"])
    if group is None:
        return None
    fitting = group[group["fits"]]
    best = fitting["perplexity"].min()
    reference = reference_row(fitting)
    saved = 1 - group["peak_memory_gb"] / float(reference["peak_memory_gb"]) if reference is not None else float("nan")
    table = pd.DataFrame(
        {
            "run_id": group["run_id"],
            "quantization": group["quant_label"],
            **dtype_columns(group),
            "rank": group["rank"],
            "modules": group["modules_label"],
            **measured(group, "perplexity", "accuracy", "peak_memory_gb"),
            "quality_change_pct": 100 * (group["perplexity"] - best) / best,
            "memory_saved_pct": 100 * saved,
            "status": status_column(group),
        }
    )
    table.loc[~group["fits"].to_numpy(), ["quality_change_pct", "memory_saved_pct"]] = float("nan")
    table = add_noise(table, group)
    return table[with_accuracy(list(table.columns), table)].reset_index(drop=True)


def _memory_change_text(saved_pct: float) -> str:
    if saved_pct >= 0:
        return f"{saved_pct:.0f}% less peak memory than the unquantized run"
    return f"{-saved_pct:.0f}% more peak memory than the unquantized run"


def quantization_findings(
    quant: pd.DataFrame | None, judge: Judge, settings: FindingSettings, memory_text: str = "peak memory"
) -> list[str]:
    """Each weight format against the best one, at tolerance sweet_spot_tolerance."""
    if quant is None:
        return []
    fitting = quant.dropna(subset=["perplexity"])
    best = fitting.loc[fitting["perplexity"].idxmin()] if len(fitting) else None
    sentences = []
    for _, row in fitting.iterrows():
        saved = (
            f", {_memory_change_text(row['memory_saved_pct'])}"
            if pd.notna(row["memory_saved_pct"]) and row["quantization"] not in UNQUANTIZED
            else ""
        )
        if row["quantization"] == best["quantization"]:
            against = "the best format"
        else:
            result = judge.compare(row["run_id"], best["run_id"], "perplexity", settings.sweet_spot_tolerance,
                                   against_best(len(fitting)))  # fmt: skip
            verdict = result.describe() if result else "not judged"
            against = f"against {best['quantization']}: {verdict}"
        sentences.append(
            f"Quantization {row['quantization']}: perplexity {sig(row['perplexity'])} ({against}), "
            f"peak memory {row['peak_memory_gb']:.2f} GB ({memory_text}){saved}."
        )
    for _, row in quant[quant["status"] != "ok"].iterrows():
        sentences.append(f"Quantization {row['quantization']}: {row['status']}.")
    return sentences


def quantization_comparison(tables: dict[str, pd.DataFrame], style: Style) -> alt.Chart | None:
    quant = tables.get("quantization")
    if quant is None:
        return None
    frame = style.with_runs(quant)
    x = alt.X("quantization:N", sort=list(quant["quantization"]), title="quantization", axis=alt.Axis(labelAngle=0))
    quality = metric_points(frame, x, "perplexity", style).properties(
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


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    quant = quantization_table(study.runs)
    return {"quantization": with_own_intervals(quant, study.judge) if quant is not None else None}


def findings(study: Study) -> list[str | None]:
    return quantization_findings(study.tables.get("quantization"), study.judge, study.settings, study.memory_short)


def charts(study: Study, style: Style) -> dict[str, alt.Chart | None]:
    return {"quantization": quantization_comparison(study.tables, style)}


QUESTION = Question(
    anchor="quantization",
    title="Quantization",
    tables=tables,
    findings=findings,
    charts=charts,
    captions={
        "quantization": "Perplexity (95 % intervals) and peak memory per weight format, at the same rank and modules.",
    },
    definitions={
        "quality_change": "(perplexity - best perplexity of the sweep) / best perplexity.",
        "memory_saved": "1 - peak memory / peak memory of the highest-precision unquantized run.",
    },
)
