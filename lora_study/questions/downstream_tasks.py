"""Downstream tasks (lm-evaluation-harness): each run against the base model, and lm-eval's exact match
beside the study's own."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from lora_study.analysis.runs import (
    baseline_ids,
    baselines,
    trained_runs,
)
from lora_study.measure.downstream import is_local
from lora_study.questions.common import (
    sig,
)
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.report.style import WIDTH, Style
from lora_study.stats.verdicts import (
    Evidence,
    compare,
    seed_pool,
)
from lora_study.study.sweep import is_baseline_id


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
            base_text = f" against {sig(base['score'].iloc[0])} for {best['base']}" if len(base) else ""
            stderr = f" (± {sig(best['stderr'])})" if pd.notna(best["stderr"]) else ""
            sentences.append(
                f"Downstream (lm-eval{version}) {task} {metric}: the best run, {best['run_id']}, scores "
                f"{sig(best['score'])}{stderr}{base_text}: {best['vs_base_detail']}."
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


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    downstream, samples = study.deployment.downstream, study.deployment.samples
    if downstream is None or not len(downstream):
        return {}
    samples = samples if samples is not None else pd.DataFrame(columns=["task", "metric", "run_id"])
    return {
        "downstream": downstream_table(study.runs, downstream, samples, study.settings),
        "downstream_agreement": agreement_table(study.runs, samples, study.deployment.examples),
    }


def findings(study: Study) -> list[str | None]:
    if "downstream" not in study.tables:
        return []
    shots = study.deployment.evaluation.get("lm_eval", {}).get("num_fewshot", 0)
    return downstream_findings(study.tables["downstream"], study.tables.get("downstream_agreement"), f", {shots}-shot")


def charts(study: Study, style: Style) -> dict[str, alt.Chart | None]:
    return {"downstream": downstream_chart(study.tables, style)}


def method_lines(study: Study) -> list[str]:
    """How downstream scores were measured (nothing when lm-eval was off)."""
    from lora_study.measure.downstream import lm_eval_version

    lm_eval = study.deployment.evaluation.get("lm_eval") or {}
    if not lm_eval.get("tasks"):
        return []
    limit = lm_eval.get("limit")
    return [
        f"Downstream: lm-evaluation-harness {lm_eval_version()} on each run as evaluated (HFLM around the "
        f"loaded model), tasks {', '.join(lm_eval['tasks'])}, {lm_eval['num_fewshot']}-shot, "
        f"{'every document' if limit is None else f'limit {limit:g}'}; standard errors from lm-eval."
    ]


QUESTION = Question(
    anchor="downstream",
    title="Downstream tasks",
    tables=tables,
    findings=findings,
    charts=charts,
    captions={
        "downstream": "lm-eval score per task with its 95 % interval (± 1.96 standard errors); the verdict against "
        "the base model is in the tooltip.",
    },
    titles={
        "downstream": "Downstream tasks (lm-evaluation-harness) against the base model",
        "downstream_agreement": "lm-eval's exact match beside the study's own, on the same prompts",
    },
    method_lines=method_lines,
)
