"""MLflow tracking of a finished study, read back through MLflow's own API (a real local SQLite store)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lora_study.report.tracking import RUN_ID_TAG, TrackingSettings, flatten, metric_key, track_study

mlflow = pytest.importorskip("mlflow")


def study_inputs(tiny_study):
    results = tiny_study / "results"
    runs = pd.read_csv(results / "tables/runs.csv")
    curves = pd.read_csv(results / "tables/loss_curves.csv")
    configs = {run["run_id"]: {"run_id": run["run_id"], "rank": int(run["rank"])} for run in runs.to_dict("records")}
    return runs, configs, curves, [results / "report/findings.md"]


def test_changed_metrics_update_the_same_mlflow_run_in_place(tiny_study, tmp_path):
    settings = TrackingSettings(uri=f"sqlite:///{tmp_path / 'store.db'}", experiment="in-place")
    runs, configs, curves, report = study_inputs(tiny_study)
    first = track_study(settings, runs, configs, curves, report, tiny_study)
    assert first.status == "ok", first.error

    edited = runs.copy()
    target = edited["run_id"].iloc[-1]
    edited.loc[edited["run_id"] == target, "perplexity"] = 123.5  # as if re-evaluated
    second = track_study(settings, edited, configs, curves, report, tiny_study)
    assert second.runs[target].action == "updated"
    assert second.runs[target].mlflow_run_id == first.runs[target].mlflow_run_id
    assert {r.action for k, r in second.runs.items() if k != target} == {"unchanged"}

    client = mlflow.MlflowClient(settings.uri)
    mlflow.set_tracking_uri(settings.uri)
    logged = mlflow.search_runs(experiment_names=["in-place"])
    assert len(logged) == len(runs) and logged[f"tags.{RUN_ID_TAG}"].is_unique
    assert client.get_run(first.runs[target].mlflow_run_id).data.metrics["perplexity"] == 123.5
    # The configuration is parameters, not metrics; flags and text are tags.
    row = logged.set_index(f"tags.{RUN_ID_TAG}").loc[target]
    assert "metrics.rank" not in logged and row["params.rank"] == str(int(runs["rank"].iloc[-1]))
    assert row["tags.runs.status"] == "ok" and row["tags.runs.is_baseline"] in ("True", "False")


def test_flatten_gives_dotted_text_parameters():
    nested = {"rank": 8, "modules": ["q", "v"], "training": {"learning_rate": 0.001, "max_steps": None}}
    assert flatten(nested) == {
        "rank": "8", "modules": "q,v", "training.learning_rate": "0.001", "training.max_steps": "",
    }  # fmt: skip
    assert json.loads(json.dumps(flatten(nested))) == flatten(nested)


def test_metric_keys_keep_runs_csv_names_mlflow_accepts():
    assert metric_key("lm_eval.arc_easy_stderr") == "lm_eval.arc_easy_stderr"
    assert metric_key("accuracy.arithmetic") == "accuracy.arithmetic"
    assert metric_key("lm_eval.task,none (acc)") == "lm_eval.task_none _acc_"
