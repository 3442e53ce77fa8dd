"""lm-eval scores and deployment records (serving cost, merge checks) as long tables, and the columns they add
to runs.csv."""

from __future__ import annotations

from typing import Any

import pandas as pd

DOWNSTREAM_COLUMNS = ("run_id", "config_id", "task", "metric", "filter", "value", "stderr", "documents", "primary",
                      "oom")  # fmt: skip
DEPLOY_COLUMNS = ("run_id", "config_id", "form")
# Serving figures per batch size (…_b1, …_b8): latency, throughput, and the repeats' spread.
SERVING_PREFIXES = ("ttft_", "ms_per_token_", "tokens_per_s_", "spread_pct_")


def downstream_frame(records: list[dict[str, Any]], config_ids: dict[str, str]) -> pd.DataFrame:
    """One row per run, task and metric (lm-eval's value and standard error)."""
    rows = [
        {"run_id": r["run_id"], "config_id": config_ids.get(r["run_id"], r["run_id"]), **score}
        for r in records
        for score in r.get("scores", [])
    ]
    # A run lm-eval could not score for memory: one row that says so (no task, not primary).
    rows += [{"run_id": r["run_id"], "config_id": config_ids.get(r["run_id"], r["run_id"]), "primary": False,
              "oom": "; ".join(f"{part}: {message}" for part, message in r["oom"].items())}
             for r in records if r.get("oom")]  # fmt: skip
    return pd.DataFrame(rows, columns=list(DOWNSTREAM_COLUMNS))


def deploy_frame(records: list[dict[str, Any]], config_ids: dict[str, str]) -> pd.DataFrame:
    """One row per run and deployed form (base, full, unmerged, merged_16bit, merged_requantized): serving
    cost and, for merged forms, the merge check."""
    rows = []
    for record in records:
        forms = list(record.get("serving", {})) + [f for f in record.get("merge", {}) if f not in record["serving"]]
        for form in forms:
            serving = record["serving"].get(form, {})
            merge = {f"merge_{k}": v for k, v in record.get("merge", {}).get(form, {}).items()}
            config_id = config_ids.get(record["run_id"], record["run_id"])
            rows.append({"run_id": record["run_id"], "config_id": config_id, "form": form, **serving, **merge})
        for part, message in record.get("oom", {}).items():  # a form that did not fit: a row that says so
            rows.append({"run_id": record["run_id"], "config_id": config_ids.get(record["run_id"], record["run_id"]),
                         "form": part, "oom": message})  # fmt: skip
    return pd.DataFrame(rows, columns=None if rows else list(DEPLOY_COLUMNS))


def runs_columns(downstream: pd.DataFrame, deploy: pd.DataFrame) -> pd.DataFrame:
    """Per run: each task's headline score and stderr, each merge's change and outcome, serving cost."""
    columns: dict[str, dict[str, Any]] = {}
    for row in downstream[downstream["primary"].fillna(False).astype(bool)].itertuples():
        entry = columns.setdefault(row.run_id, {})
        entry[f"lm_eval.{row.task}"] = row.value
        entry[f"lm_eval.{row.task}_stderr"] = row.stderr
    serving_keys = [c for c in deploy.columns if c.startswith(SERVING_PREFIXES)]
    for row in deploy.to_dict("records"):
        entry = columns.setdefault(row["run_id"], {})
        for key in [*serving_keys, "peak_memory_gb"]:
            if pd.notna(row.get(key)):
                entry[f"serve.{row['form']}.{key}"] = row[key]
        for key in ("change", "outcome"):
            if pd.notna(row.get(f"merge_{key}")):
                entry[f"merge.{row['form']}.{key}"] = row[f"merge_{key}"]
    return pd.DataFrame.from_dict(columns, orient="index").rename_axis("run_id").reset_index()
