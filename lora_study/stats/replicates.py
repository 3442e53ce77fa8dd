"""Replicate runs (seeds) of one configuration: mean, spread and a noise test."""

from __future__ import annotations

import math

import pandas as pd

# Metrics summarised per configuration (mean, std, 95 % CI half-width).
REPLICATED_METRICS = (
    "perplexity",
    "eval_loss",
    "accuracy",
    "peak_memory_gb",
    "train_wall_s",
    "train_tokens_per_s",
    "loss_tokens_per_s",
    "final_train_loss",
    "eval_tokens_per_s",
)
CONFIDENCE = 0.95


def ci_halfwidth(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the t-based confidence interval of a mean; NaN for n < 2."""
    from scipy import stats

    if n < 2 or not math.isfinite(std):
        return float("nan")
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))


def _first_not_ok(statuses: pd.Series) -> str:
    bad = [s for s in statuses.fillna("ok") if s != "ok"]
    return bad[0] if bad else "ok"


def config_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (config_id), in first-seen order.

    Metric columns hold the mean over seeds, with `<metric>_std`,
    `<metric>_ci95` (half-width) and `n` beside them; the configuration id is
    the row's `run_id`, so the findings read this table like the runs table.
    A configuration fits only when every seed fitted.
    """
    if "config_id" not in runs:
        runs = runs.assign(config_id=runs["run_id"])
    rows = []
    for config_id, group in runs.groupby("config_id", sort=False):
        row = {k: v for k, v in group.iloc[0].to_dict().items() if k not in ("seed", "training.seed")}
        row["run_id"] = config_id
        row["n"] = len(group)
        row["seeds"] = ",".join(str(s) for s in group.get("seed", pd.Series(dtype=object)).dropna())
        row["status"] = _first_not_ok(group.get("status", pd.Series(["ok"] * len(group))))
        for metric in REPLICATED_METRICS:
            if metric not in group:
                continue
            values = pd.to_numeric(group[metric], errors="coerce").dropna()
            std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            row[metric] = float(values.mean()) if len(values) else float("nan")
            row[f"{metric}_std"] = std
            row[f"{metric}_ci95"] = ci_halfwidth(std, len(values))
        rows.append(row)
    return pd.DataFrame(rows)
