"""Merging and serving: whether each merged adapter scores like the unmerged one, and what each
configuration costs to serve."""

from __future__ import annotations

import math
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from lora_study.analysis.deployment import SERVING_PREFIXES
from lora_study.measure.forms import MERGE_FLAGGED, MERGE_UNCLEAR, MERGED_16BIT, MERGED_REQUANTIZED, UNMERGED
from lora_study.questions.common import (
    sig,
)
from lora_study.report.question import Question, Study
from lora_study.report.style import WIDTH, Style
from lora_study.stats.verdicts import (
    Comparison,
    decide,
)


def merge_table(runs: pd.DataFrame, deploy: pd.DataFrame, tolerance: float | None = None) -> pd.DataFrame | None:
    """Per adapter run (every seed): perplexity unmerged, merged into the original base, merged then re-quantized.

    With `tolerance`, every check is judged again at m = the number of checks the table holds (adapters x
    forms), as the merge sentence counts flags over all of them.
    """
    if deploy.empty or "merge_change" not in deploy:
        return None
    merged = deploy[deploy["form"].isin([MERGED_16BIT, MERGED_REQUANTIZED]) & deploy["merge_change"].notna()]
    if merged.empty:
        return None
    checks = len(merged)
    rows = []
    for run_id, group in merged.groupby("run_id", sort=False):
        row: dict[str, Any] = {"run_id": run_id, "config_id": group["config_id"].iloc[0],
                               "unmerged_perplexity": group["merge_reference_perplexity"].iloc[0]}  # fmt: skip
        for form in (MERGED_16BIT, MERGED_REQUANTIZED):
            found = group[group["form"] == form]
            if len(found):
                entry = found.iloc[0]
                outcome, detail = _merge_judged(entry, tolerance, checks)
                row[f"{form}_perplexity"] = entry["merge_perplexity"]
                row[f"{form}_change_pct"] = 100 * entry["merge_change"]
                row[f"{form}_check"] = outcome
                row[f"{form}_detail"] = detail
        rows.append(row)
    quant = dict(zip(runs["run_id"], runs["quant_label"], strict=True)) if "quant_label" in runs else {}
    table = pd.DataFrame(rows)
    table.insert(2, "format", table["config_id"].map(quant).fillna(table["run_id"].map(quant)).fillna(""))
    table.attrs["checks"] = checks
    return table


def _merge_judged(entry: pd.Series, tolerance: float | None, checks: int) -> tuple[str, str]:
    """(outcome, description) of one merge check at m = checks; as recorded (m = 1) for records without a
    standard error (written before the report re-judged them) or without a tolerance."""
    se, df = entry.get("merge_se"), entry.get("merge_df")
    if tolerance is None or se is None or pd.isna(se):
        return entry["merge_outcome"], entry["merge_describe"]
    from lora_study.measure.forms import MERGE_OUTCOMES

    df = float(df) if pd.notna(df) else math.inf
    low, high, eq_low, eq_high, verdict = decide(math.log1p(entry["merge_change"]), se, df, "perplexity", tolerance,
                                                 checks)  # fmt: skip
    judged = Comparison("perplexity", entry["merge_change"], low, high, eq_low, eq_high, tolerance, checks, se,
                        math.nan, 1, 0, verdict, df=df)  # fmt: skip
    detail = f"{verdict.value} ({judged.interval_text()}, tolerance {tolerance:.0%}, {checks} checks, {judged.noise})"
    return MERGE_OUTCOMES[verdict], detail


def merge_finding(table: pd.DataFrame | None, tolerance_text: str) -> str | None:
    if table is None:
        return None
    parts = []
    for form, label in ((MERGED_16BIT, "into the original base"), (MERGED_REQUANTIZED, "then re-quantized")):
        column = f"{form}_check"
        if column not in table:
            continue
        flagged = table[table[column] == MERGE_FLAGGED]
        unclear = table[table[column] == MERGE_UNCLEAR]
        changes = table[f"{form}_change_pct"].dropna()
        span = f"{changes.min():+.1f}% to {changes.max():+.1f}%"
        adapters = f"{len(changes)} adapter{'s' if len(changes) != 1 else ''}"
        text = f"merged {label}: perplexity change {span} over {adapters}"
        if len(flagged):
            text += f", flagged ({len(flagged)}): " + ", ".join(
                f"{r.run_id} {getattr(r, f'{form}_change_pct'):+.1f}%" for r in flagged.itertuples()
            )
        else:
            text += ", none flagged"
        if len(unclear):
            text += f", {len(unclear)} not decided by the validation rows"
        parts.append(text)
    return f"Merge check ({tolerance_text}): " + "; ".join(parts) + "." if parts else None


def serving_table(runs: pd.DataFrame, deploy: pd.DataFrame) -> pd.DataFrame | None:
    """Per run and form: latency, throughput and memory; unmerged adapters' overhead over their merged form."""
    if deploy.empty or "ms_per_token_b1" not in deploy:
        return None
    served = deploy[deploy["ms_per_token_b1"].notna()].copy()
    if served.empty:
        return None
    keep = ["run_id", "form", *[c for c in served.columns if c.startswith(SERVING_PREFIXES)],
            "peak_memory_gb", "memory_kind"]  # fmt: skip
    table = served.assign(run_id=served["config_id"])[keep].reset_index(drop=True)
    merged_cost = {
        run: group.loc[group["form"] != UNMERGED, "ms_per_token_b1"].min()
        for run, group in table.groupby("run_id", sort=False)
    }
    table["unmerged_overhead_pct"] = [
        100 * (row.ms_per_token_b1 / merged_cost[row.run_id] - 1) if row.form == UNMERGED else np.nan
        for row in table.itertuples()
    ]
    method = dict(zip(runs["run_id"], runs.get("method", pd.Series(["lora"] * len(runs))), strict=True))
    table.insert(1, "method", table["run_id"].map(method).fillna(""))
    return table


def serving_finding(table: pd.DataFrame | None, settings_text: str) -> str | None:
    if table is None:
        return None
    base = table[table["form"] == "base"]
    unmerged = table[(table["form"] == UNMERGED) & table["unmerged_overhead_pct"].notna()]
    parts = []
    if len(base):
        parts.append("the base model takes " + ", ".join(
            f"{sig(r.ms_per_token_b1)} ms per token ({r.run_id})" for r in base.itertuples()))  # fmt: skip
    if len(unmerged):
        worst = unmerged.loc[unmerged["unmerged_overhead_pct"].idxmax()]
        by_method = unmerged.groupby("method")["unmerged_overhead_pct"].median()
        methods = ", ".join(f"{m} {v:+.0f}%" for m, v in by_method.items())
        parts.append(
            f"an unmerged adapter costs {unmerged['unmerged_overhead_pct'].median():+.0f}% per token over its merged "
            f"form (median of {len(unmerged)}; by method: {methods}; largest {worst['run_id']} "
            f"{worst['unmerged_overhead_pct']:+.0f}%)"
        )
    if parts and "spread_pct_b1" in table and table["spread_pct_b1"].notna().any():
        # One job per form and no interval: the repeats' spread is how far apart two figures must be to count.
        spread = table["spread_pct_b1"]
        parts.append(f"not judged by intervals: repeated generations spread by up to {spread.max():.0f}% "
                     f"(median {spread.median():.0f}%), so smaller differences are not resolved")  # fmt: skip
    return f"Serving ({settings_text}): " + "; ".join(parts) + "." if parts else None


def serving_text(serving: dict[str, Any]) -> str:
    if not serving:
        return "greedy generation"
    return (f"greedy, {serving['prompt_tokens']}-token prompt, {serving['new_tokens']} new tokens, batch 1, "
            f"median of {serving['repeats']} after {serving['warmup']} untimed warm-up")  # fmt: skip


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


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    deploy = study.deployment.deploy
    if deploy is None or not len(deploy):
        return {}
    tolerance = study.deployment.evaluation.get("merge_check", {}).get("tolerance", 0.01)
    return {"merge_check": merge_table(study.runs, deploy, tolerance), "serving": serving_table(study.runs, deploy)}


def findings(study: Study) -> list[str | None]:
    deploy, evaluation = study.deployment.deploy, study.deployment.evaluation
    if deploy is None or not len(deploy):
        return []
    merge = study.tables.get("merge_check")
    tolerance = evaluation.get("merge_check", {}).get("tolerance", 0.01)
    checks = merge.attrs.get("checks", 1) if merge is not None else 1
    return [
        merge_finding(
            merge,
            f"tolerance {tolerance:.0%}, {checks} checks corrected together, against the unmerged "
            "adapter on its training base, same validation rows",
        ),
        serving_finding(study.tables.get("serving"), serving_text(evaluation.get("serving", {}))),
    ]


def charts(study: Study, style: Style) -> dict[str, alt.Chart | None]:
    return {"serving": serving_chart(study.tables, style)}


def method_lines(study: Study) -> list[str]:
    """How the merge check and serving cost were measured (nothing when they were off)."""
    lines = []
    merge = study.deployment.evaluation.get("merge_check") or {}
    if merge.get("enabled"):
        lines.append(
            "Merge check: each adapter merged into the original base weights in the run's compute dtype and, for "
            "4/8-bit runs, re-quantized to the run's format after merging, scored on the validation rows the "
            f"unmerged adapter was scored on; flagged beyond {merge['tolerance']:.0%} and evaluation noise."
        )
    serving = study.deployment.evaluation.get("serving") or {}
    if serving.get("enabled"):
        lines.append(f"Serving: {serving_text(serving)}, also at batch {serving['batch_size']}.")
    return lines


QUESTION = Question(
    anchor="deployment",
    title="Merging and serving",
    tables=tables,
    findings=findings,
    charts=charts,
    captions={
        "serving": "Milliseconds per generated token at batch 1 for each run and each way it can be deployed.",
    },
    titles={
        "merge_check": "Merge check: perplexity of each way of merging, against the unmerged adapter",
        "serving": "What each configuration costs to serve",
    },
    method_lines=method_lines,
)
