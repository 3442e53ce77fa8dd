"""Downstream scores, the merge check and serving cost: the report's tables and their sentences."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from lora_study.analysis.deployment import SERVING_PREFIXES
from lora_study.measure.deploy import MERGE_FLAGGED, MERGE_UNCLEAR, MERGED_16BIT, MERGED_REQUANTIZED, UNMERGED
from lora_study.measure.downstream import is_local
from lora_study.questions.findings import FindingSettings, _fmt, baseline_ids, baselines, trained_runs
from lora_study.stats.verdicts import Evidence, compare, seed_pool
from lora_study.study.sweep import is_baseline_id

# --- downstream -------------------------------------------------------------------------------------------


def _task_evidence(task_docs: pd.DataFrame) -> dict[str, Evidence]:
    """Per configuration: its seeds' per-document scores on one task (documents in one order)."""
    evidence = {}
    for config_id, group in task_docs.groupby("config_id", sort=False):
        runs = [run.sort_values(["task", "doc_id"])["score"].to_numpy(float) for _, run in group.groupby("run_id")]
        if len({len(r) for r in runs}) != 1 or not len(runs[0]):
            continue
        scores = np.stack(runs)
        evidence[str(config_id)] = Evidence(nll=np.zeros_like(scores), tokens=np.ones(scores.shape[1]),
                                            correct=scores, trained=not is_baseline_id(str(config_id)))  # fmt: skip
    return evidence


def downstream_table(
    runs: pd.DataFrame, downstream: pd.DataFrame, samples: pd.DataFrame, settings: FindingSettings
) -> pd.DataFrame | None:
    """Each run's headline score per task with lm-eval's stderr and a verdict against the base model in
    its own weight format (paired over documents; tolerance min_relative_gain in points; m = runs judged)."""
    primary = downstream[downstream["primary"].fillna(False).astype(bool)]
    if primary.empty:
        return None
    base_of = _base_ids(runs)
    trained = set(trained_runs(runs)["run_id"])
    rows = []
    for (task, metric), scores in primary.groupby(["task", "metric"], sort=False):
        docs = samples[(samples["metric"] == metric) & (samples["configured_task"] == task)]
        evidence = _task_evidence(docs)
        pool = seed_pool(evidence, "accuracy")  # one-seed runs borrow the replicated configurations' seed noise
        judged = [c for c in scores["config_id"] if c in trained]
        for row in scores.itertuples():
            base = base_of.get(row.config_id)
            comparison = None
            if row.config_id in trained and base in evidence and row.config_id in evidence:
                comparison = compare(evidence[row.config_id], evidence[base], "accuracy",
                                     settings.min_relative_gain, len(judged), pool)  # fmt: skip
            rows.append({
                "run_id": row.config_id, "task": task, "metric": metric, "score": row.value,
                "stderr": row.stderr, "documents": row.documents, "base": base or "",
                "vs_base": comparison.verdict.value if comparison else "",
                "vs_base_detail": comparison.describe() if comparison else "",
            })  # fmt: skip
    return pd.DataFrame(rows)


def _base_ids(runs: pd.DataFrame) -> dict[str, str]:
    known = set(baselines(runs)["run_id"])
    return {run: base for run, base in zip(runs["run_id"], baseline_ids(runs), strict=True) if base in known}


def agreement_table(runs: pd.DataFrame, samples: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame | None:
    """lm-eval's exact match on the study's own prompts beside the study's own, row by row, per run."""
    local = samples[samples["task"].map(is_local) & (samples["metric"] == "exact_match")]
    if local.empty or examples is None or "correct" not in examples:
        return None
    own = examples.dropna(subset=["correct"])[["run_id", "row", "correct"]]
    joined = local.merge(own, on=["run_id", "row"], how="inner")
    if joined.empty:
        return None
    rows = []
    for run_id, group in joined.groupby("run_id", sort=False):
        rows.append({
            "run_id": run_id, "documents": len(group), "lm_eval_exact_match": group["score"].mean(),
            "own_exact_match": group["correct"].astype(float).mean(),
            "agreement": (group["score"].astype(float) == group["correct"].astype(float)).mean(),
        })  # fmt: skip
    order = {run: i for i, run in enumerate(runs["run_id"])}
    return pd.DataFrame(rows).sort_values("run_id", key=lambda s: s.map(order)).reset_index(drop=True)


def downstream_findings(table: pd.DataFrame | None, agreement: pd.DataFrame | None, version: str) -> list[str]:
    """Per task: the best run against its base model, with the verdict; then how lm-eval and the study agree."""
    sentences = []
    if table is not None:
        for (task, metric), group in table.groupby(["task", "metric"], sort=False):
            judged = group[group["vs_base"] != ""]
            if judged.empty:
                continue
            best = judged.loc[judged["score"].idxmax()]
            base = group[group["run_id"] == best["base"]]
            base_text = f" against {_fmt(base['score'].iloc[0])} for {best['base']}" if len(base) else ""
            stderr = f" (± {_fmt(best['stderr'])})" if pd.notna(best["stderr"]) else ""
            sentences.append(
                f"Downstream (lm-eval{version}) {task} {metric}: the best run, {best['run_id']}, scores "
                f"{_fmt(best['score'])}{stderr}{base_text}: {best['vs_base_detail']}."
            )
    if agreement is not None and len(agreement):
        same = (agreement["agreement"] * agreement["documents"]).sum()
        total = agreement["documents"].sum()
        sentences.append(
            f"lm-eval's exact match on the study's own prompts agrees with the study's own exact match on "
            f"{round(same)} of {int(total)} answers over {len(agreement)} runs (the same prompt tokens, greedy "
            "decoding and answer normalisation; the two batch and pad prompts differently)."
        )
    return sentences


# --- merge check --------------------------------------------------------------------------------------------


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
    from lora_study.measure.deploy import MERGE_OUTCOMES
    from lora_study.stats.verdicts import Comparison, decide

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


# --- serving cost -----------------------------------------------------------------------------------------


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
            f"{_fmt(r.ms_per_token_b1)} ms per token ({r.run_id})" for r in base.itertuples()))  # fmt: skip
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


# --- the report ---------------------------------------------------------------------------------------------


def deployment_report(
    runs: pd.DataFrame,
    downstream: pd.DataFrame | None,
    samples: pd.DataFrame | None,
    deploy: pd.DataFrame | None,
    examples: pd.DataFrame | None,
    evaluation: dict[str, Any],
    settings: FindingSettings,
) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """The downstream, merge-check and serving tables with their sentences (none when nothing was measured)."""
    tables: dict[str, pd.DataFrame | None] = {}
    findings: list[str | None] = []
    if downstream is not None and len(downstream):
        samples = samples if samples is not None else pd.DataFrame(columns=["task", "metric", "run_id"])
        tables["downstream"] = downstream_table(runs, downstream, samples, settings)
        tables["downstream_agreement"] = agreement_table(runs, samples, examples)
        shots = evaluation.get("lm_eval", {}).get("num_fewshot", 0)
        findings += downstream_findings(tables["downstream"], tables["downstream_agreement"], f", {shots}-shot")
    if deploy is not None and len(deploy):
        tolerance = evaluation.get("merge_check", {}).get("tolerance", 0.01)
        tables["merge_check"] = merge_table(runs, deploy, tolerance)
        checks = tables["merge_check"].attrs.get("checks", 1) if tables["merge_check"] is not None else 1
        findings.append(merge_finding(tables["merge_check"], f"tolerance {tolerance:.0%}, {checks} checks corrected "
                                      "together, against the unmerged adapter on its training base, same validation "
                                      "rows"))  # fmt: skip
        tables["serving"] = serving_table(runs, deploy)
        findings.append(serving_finding(tables["serving"], serving_text(evaluation.get("serving", {}))))
    return {k: v for k, v in tables.items() if v is not None}, [s for s in findings if s]


def oom_finding(downstream: pd.DataFrame | None, deploy: pd.DataFrame | None,
                anatomy: pd.DataFrame | None = None) -> str | None:  # fmt: skip
    """The parts of the downstream, deploy and anatomy stages that ran out of memory (recorded, not crashed)."""
    parts = []
    for stage, frame, what in (("lm-eval", downstream, None), ("deploy", deploy, "form"), ("anatomy", anatomy, None)):
        if frame is None or "oom" not in frame:
            continue
        for row in frame[frame["oom"].notna() & frame["oom"].astype(str).ne("")].to_dict("records"):
            where = f" ({row[what]})" if what else ""
            parts.append(f"{stage} of {row['run_id']}{where}: {row['oom']}")
    if not parts:
        return None
    return "Did not fit in memory (recorded as data; the rest of the study was measured): " + "; ".join(parts) + "."


def serving_text(serving: dict[str, Any]) -> str:
    if not serving:
        return "greedy generation"
    return (f"greedy, {serving['prompt_tokens']}-token prompt, {serving['new_tokens']} new tokens, batch 1, "
            f"median of {serving['repeats']} after {serving['warmup']} untimed warm-up")  # fmt: skip


def deployment_method_lines(evaluation: dict[str, Any]) -> list[str]:
    """How downstream scores, the merge check and serving cost were measured (nothing when they were off)."""
    from lora_study.measure.downstream import lm_eval_version

    lines = []
    lm_eval = evaluation.get("lm_eval") or {}
    if lm_eval.get("tasks"):
        limit = lm_eval.get("limit")
        lines.append(
            f"Downstream: lm-evaluation-harness {lm_eval_version()} on each run as evaluated (HFLM around the "
            f"loaded model), tasks {', '.join(lm_eval['tasks'])}, {lm_eval['num_fewshot']}-shot, "
            f"{'every document' if limit is None else f'limit {limit:g}'}; standard errors from lm-eval."
        )
    merge = evaluation.get("merge_check") or {}
    if merge.get("enabled"):
        lines.append(
            "Merge check: each adapter merged into the original base weights in the run's compute dtype and, for "
            "4/8-bit runs, re-quantized to the run's format after merging, scored on the validation rows the "
            f"unmerged adapter was scored on; flagged beyond {merge['tolerance']:.0%} and evaluation noise."
        )
    serving = evaluation.get("serving") or {}
    if serving.get("enabled"):
        lines.append(f"Serving: {serving_text(serving)}, also at batch {serving['batch_size']}.")
    return lines
