"""One row per evaluated run: every config field and every metric."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from lora_study.core.io import atomic_path
from lora_study.core.metrics import STATUS_OK
from lora_study.study.budget import GPU_COUNTS, per_gpu_column
from lora_study.study.methods import LORA

CONFIG_COLUMNS = ("run_id", "config_id", "is_baseline", "rank", "alpha", "modules", "quantization", "double_quant")
# The readable subset shown in runs.md; runs.csv has every column.
SUMMARY_COLUMNS = (
    "run_id",
    "method",
    "rank",
    "alpha",
    "modules",
    "quantization",
    "compute_dtype",
    "perplexity",
    "accuracy",
    "peak_memory_gb",
    "memory_kind",
    "train_wall_s",
    "train_tokens_per_s",
    "trainable_params",
    "adapter_size_mb",
)


def _flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{key}": value for key, value in values.items()}


# Planner columns carried into the runs table (as plan_<name>), next to what was measured: the
# predictions and their terms (lora_study.questions.memory_plan.MEMORY_TERMS).
PLAN_COLUMNS = (
    "predicted_cuda_gb",
    "predicted_cuda_allocated_gb",
    "predicted_cpu_gb",
    "skip",
    "weights_gb",
    "adapter_weights_gb",
    "gradients_optimizer_gb",
    "activations_gb",
    "backward_working_gb",
    "logits_gb",
    "gpus",
    "gathered_gb",
    *(per_gpu_column("cuda", gpus) for gpus in GPU_COUNTS),
)


def run_row(
    run: dict[str, Any],
    evaluation: dict[str, Any],
    training: dict[str, Any] | None,
    plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    row: dict[str, Any] = {key: run[key] for key in CONFIG_COLUMNS}
    row["method"] = run.get("method", LORA)
    row["rank_pattern"] = run.get("rank_pattern", "")
    row["modules"] = ",".join(run["modules"])
    run_training = run["training"] or {}
    row["seed"] = run_training.get("seed")
    row.update(_flatten("training.", run_training))
    eval_metrics = {
        k: v
        for k, v in evaluation.items()
        if k not in ("run_id", "memory", "accuracy_by_family", "device", "failure", "environment", "capability")
    }
    row.update(eval_metrics)
    row["eval_compute_dtype"] = evaluation.get("compute_dtype")
    row.update(_flatten("capability.", evaluation.get("capability") or {}))
    row.update(_flatten("accuracy.", evaluation["accuracy_by_family"]))
    row.update(_flatten("eval_", evaluation["memory"]))
    row.update(_flatten("eval_", evaluation.get("environment", {})))
    if training is not None:
        nested = (
            "run_id",
            "memory",
            "environment",
            "failure",
            "recipe",
            "capability",
            "memory_plan",
            "target_coverage",
        )
        train_metrics = {k: v for k, v in training.items() if k not in nested}
        train_metrics["target_layers"] = coverage_text(training.get("target_coverage") or {})
        train_metrics["target_modules"] = _join(train_metrics["target_modules"])
        train_metrics["target_parameters"] = _join(train_metrics.get("target_parameters") or [])
        # Training's resolved dtype wins: it is what the adapter was trained in.
        row.update({k: v for k, v in train_metrics.items() if v is not None or k not in row})
        row.update(_flatten("capability.", training.get("capability") or {}))
        row.update(training["memory"])
        row.update(training.get("environment", {}))
        # A run that trained but could not be evaluated (oom) carries the evaluation's status.
        if training["status"] == STATUS_OK:
            row["status"] = evaluation.get("status", STATUS_OK)
        row.update(_flatten("failure.", training.get("failure") or evaluation.get("failure") or {}))
    else:
        # The baseline trains nothing: its memory is what inference needed.
        baseline = {"trainable_params": 0, "adapter_size_mb": 0.0, "device": evaluation["device"]}
        row.update({"status": evaluation.get("status", STATUS_OK), **baseline})
        row.update(evaluation["memory"])
    if plan is not None:
        # A plan.csv written before a column existed lacks it (NaN: that term is not charted).
        row.update({f"plan_{key}": plan.get(key, math.nan) for key in PLAN_COLUMNS})
        row["plan_error"] = plan.get("plan_error") or ""  # the planner failed: no prediction for this run
    return row


def _join(value: list[str] | str) -> str:
    return value if isinstance(value, str) else ",".join(value)


def runs_table(
    runs: list[dict[str, Any]],
    evaluations: list[dict[str, Any]],
    trainings: list[dict[str, Any]],
    plans: dict[str, dict[str, Any]] | None = None,
) -> pd.DataFrame:
    """Runs in config order (baseline first), joined with their metrics and memory plan by run id."""
    plans = plans or {}
    eval_by_id = {e["run_id"]: e for e in evaluations}
    train_by_id = {t["run_id"]: t for t in trainings}
    missing = [r["run_id"] for r in runs if r["run_id"] not in eval_by_id]
    if missing:
        raise ValueError(f"no evaluation for runs {missing}")
    rows = [run_row(r, eval_by_id[r["run_id"]], train_by_id.get(r["run_id"]), plans.get(r["run_id"])) for r in runs]
    return pd.DataFrame(rows)


CONFIG_SUMMARY_COLUMNS = (
    "run_id",
    "n",
    "perplexity",
    "perplexity_std",
    "perplexity_ci95",
    "accuracy",
    "accuracy_ci95",
    "peak_memory_gb",
    "train_wall_s",
    "train_wall_s_ci95",
    "trainable_params",
)


def coverage_text(coverage: dict[str, Any]) -> str:
    """'q: 8/32 layers; mlp: 32/32 layers' from a run's target_coverage ('' before it was recorded)."""
    return "; ".join(f"{group}: {found['layers']}/{found['of']} layers" for group, found in coverage.items())


def combine_per_run(
    paths: list[str], run_ids: list[str], out_path: str | Path, columns: list[str], table: pd.DataFrame | None = None
) -> None:
    """Every run's CSV (loss curve, anatomy) in one long table with a run_id column; `columns` if there are none.

    With the runs `table`, each row also names the configuration its run replicates (config_id).
    """
    config_ids = dict(zip(table["run_id"], table["config_id"], strict=True)) if table is not None else {}
    frames = [
        pd.read_csv(path).assign(run_id=run_id, config_id=config_ids.get(run_id, run_id))
        for path, run_id in zip(paths, run_ids, strict=True)
    ]
    frames = [frame for frame in frames if len(frame)]
    combined = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id", "config_id", *columns])
    )
    with atomic_path(out_path) as tmp:
        combined.to_csv(tmp, index=False)


def combine_loss_curves(curve_paths: list[str], run_ids: list[str], out_path: str | Path) -> None:
    """Every run's loss curve in one long table (run_id, step, loss, ...)."""
    combine_per_run(curve_paths, run_ids, out_path, ["step", "loss"])


def combine_examples(example_paths: list[str], table: pd.DataFrame, out_path: str | Path) -> None:
    """Every run's per-row scores (validation, or general text) in one long table, with the configuration and
    seed each run belongs to; empty when there are none (forgetting off)."""
    runs = table.set_index("run_id")
    frames = []
    for path in example_paths:
        run_id = Path(path).parent.name  # results/runs/<run>/examples.csv
        config_id = runs.loc[run_id, "config_id"] if "config_id" in runs else run_id
        frames.append(pd.read_csv(path).assign(run_id=run_id, config_id=config_id, seed=runs.loc[run_id, "seed"]))
    columns = ["row", "nll", "tokens", "correct", "run_id", "config_id", "seed"]
    combined = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    with atomic_path(out_path) as tmp:
        combined.to_csv(tmp, index=False)


def deployment_frames(
    downstream: list[dict[str, Any]], samples: list[pd.DataFrame], deploy: list[dict[str, Any]], table: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """lm-eval scores, per-document scores and deployment records as long tables keyed by run and configuration."""
    from lora_study.analysis.deployment import deploy_frame, downstream_frame
    from lora_study.measure.downstream import SAMPLE_COLUMNS

    config_ids = dict(zip(table["run_id"], table["config_id"], strict=True))
    frames = [frame for frame in samples if len(frame)]
    combined = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*SAMPLE_COLUMNS, "run_id"])
    combined["config_id"] = combined["run_id"].map(config_ids)
    # Scores written before documents named their configured task: each document is its own task's.
    combined["configured_task"] = combined.get("configured_task", combined["task"]).fillna(combined["task"])
    return downstream_frame(downstream, config_ids), combined, deploy_frame(deploy, config_ids)


def with_deployment_columns(table: pd.DataFrame, downstream: pd.DataFrame, deploy: pd.DataFrame) -> pd.DataFrame:
    """runs.csv with each run's lm-eval scores, merge check and serving cost (none when they are off)."""
    from lora_study.analysis.deployment import runs_columns

    extra = runs_columns(downstream, deploy)
    return table.merge(extra, on="run_id", how="left") if len(extra) else table
