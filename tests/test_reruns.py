"""Editing the config reruns exactly the affected jobs (a real Snakemake, tiny model).

Each test copies a finished study (results and Snakemake's metadata), makes one
kind of edit, and checks the jobs Snakemake plans, by rule and run id.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, run_snakemake

REPORT_JOBS = {("aggregate", None), ("findings", None), ("all", None)}
# The memory plan covers every run: any edit to the set of runs replans (seconds, no weights loaded).
PLAN_JOB = {("plan", None)}
RUN_IDS = ("r4-qv-fp32", "r8-qv-fp32", "custom")


def rerun_config(model_dir: Path) -> dict:
    return {
        "model": {"source": str(model_dir)},
        "dataset": {"source": "generated", "generated_examples": 200, "validation_size": 16, "max_length": 128},
        "training": {"max_steps": 2, "batch_size": 4, "warmup_steps": 0, "learning_rate": 0.001},
        "evaluation": {"batch_size": 8, "exact_match_examples": 4, "max_new_tokens": 4},
        "sweep": {
            "grids": [{"rank": [4, 8], "modules": [["q", "v"]], "quantization": ["fp32"]}],
            "runs": [
                {
                    "id": "custom",
                    "rank": 4,
                    "modules": ["q", "v"],
                    "quantization": "fp32",
                    "training": {"learning_rate": 0.01},
                }
            ],
        },
    }


def planned_jobs(workdir: Path, *extra: str) -> set[tuple[str, str | None]]:
    """(rule, run id) of every job a dry run plans."""
    result = run_snakemake(workdir, "--cores", "2", "--dry-run", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", result.stdout):
        if match := re.match(r"(?:local)?rule (\w+):", block):
            run = re.search(r"wildcards: run=([\w.+-]+)", block)
            jobs.add((match[1], run[1] if run else None))
    return jobs


# What an edit to a run's own settings reruns: its check, its training, its evaluation, its anatomy.
RUN_RULES = ("check_run", "train", "evaluate", "anatomy")
# What retraining a run (new data, model or memory verdict) reruns.
RETRAIN_RULES = ("train", "evaluate", "anatomy")


def per_run(rules: tuple[str, ...], runs) -> set[tuple[str, str]]:
    return {(rule, run) for rule in rules for run in runs}


def snapshot(workdir: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file of every run."""
    return {
        str(p.relative_to(workdir)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted((workdir / "results/runs").rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_study(tiny_llama, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("rerun-study")
    (workdir / "config.yaml").write_text(yaml.safe_dump(rerun_config(tiny_llama)))
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir


@pytest.fixture
def study(finished_study, tmp_path) -> tuple[Path, dict]:
    """A private copy of the finished study (mtimes kept) and its config."""
    workdir = tmp_path / "study"
    shutil.copytree(finished_study, workdir, symlinks=True)
    return workdir, yaml.safe_load((workdir / "config.yaml").read_text())


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def test_reordered_and_reformatted_config_reruns_nothing(study):
    workdir, config = study
    text = yaml.safe_dump(config, sort_keys=True, default_flow_style=True)
    text = text.replace("learning_rate: 0.001", "learning_rate: 1.0e-3")
    (workdir / "config.yaml").write_text(text)
    assert planned_jobs(workdir) == set()


def test_adding_a_run_trains_only_it_and_removing_one_touches_no_files(study):
    workdir, config = study
    added = copy.deepcopy(config)
    added["sweep"]["grids"][0]["rank"] = [4, 8, 16]
    write_config(workdir, added)
    assert planned_jobs(workdir) == per_run(RUN_RULES, ["r16-qv-fp32"]) | PLAN_JOB | REPORT_JOBS

    before = snapshot(workdir)
    config["sweep"]["grids"][0]["rank"] = [4]
    write_config(workdir, config)
    assert planned_jobs(workdir) == PLAN_JOB | REPORT_JOBS
    assert run_snakemake(workdir, "--cores", "2").returncode == 0
    assert snapshot(workdir) == before  # r8's files stay, untouched
    table = (workdir / "results/tables/runs.csv").read_text()
    assert "r8-qv-fp32" not in table and "r4-qv-fp32" in table


def test_shared_default_reruns_runs_using_it_but_not_an_override(study):
    workdir, config = study
    config["training"]["learning_rate"] = 0.005
    write_config(workdir, config)
    # custom overrides learning_rate; the baseline trains nothing.
    expected = per_run(RUN_RULES, ["r4-qv-fp32", "r8-qv-fp32"]) | PLAN_JOB | REPORT_JOBS
    assert planned_jobs(workdir) == expected


def test_adding_a_learning_rate_trains_only_the_new_runs(study):
    workdir, config = study
    # 0.001 is both the shared and the schema's default: those runs keep their ids and results.
    config["sweep"]["grids"][0]["training"] = {"learning_rate": [0.001, 0.003]}
    write_config(workdir, config)
    assert planned_jobs(workdir) == per_run(RUN_RULES, ["r4-qv-fp32-lr3e-3", "r8-qv-fp32-lr3e-3"]) | PLAN_JOB | (
        REPORT_JOBS
    )


def test_changing_one_named_runs_method_reruns_only_it(study):
    workdir, config = study
    config["sweep"]["runs"][0]["method"] = "dora"
    write_config(workdir, config)
    assert planned_jobs(workdir) == per_run(RUN_RULES, ["custom"]) | PLAN_JOB | REPORT_JOBS


def test_memory_budget_skips_and_reruns_only_runs_it_flips(study):
    workdir, config = study
    plan = pd.read_csv(workdir / "results/tables/plan.csv").set_index("run_id")["predicted_cpu_gb"]
    assert plan["r8-qv-fp32"] > plan["r4-qv-fp32"] == plan["custom"]  # rank 8 holds more LoRA state
    config["plan"] = {"device": "cpu", "memory_budget_gb": float((plan["r8-qv-fp32"] + plan["r4-qv-fp32"]) / 2)}
    write_config(workdir, config)
    assert planned_jobs(workdir) == per_run(RETRAIN_RULES, ["r8-qv-fp32"]) | PLAN_JOB | REPORT_JOBS
    assert run_snakemake(workdir, "--cores", "2").returncode == 0
    runs = pd.read_csv(workdir / "results/tables/runs.csv").set_index("run_id")
    assert runs.loc["r8-qv-fp32", "status"] == "skipped" and pd.isna(runs.loc["r8-qv-fp32", "perplexity"])
    assert (runs.drop("r8-qv-fp32")["status"] == "ok").all()
    assert "Skipped by the memory budget: r8-qv-fp32" in (workdir / "results/report/findings.md").read_text()

    config["plan"]["memory_budget_gb"] = None  # lifting the budget trains just the skipped run
    write_config(workdir, config)
    assert planned_jobs(workdir) == per_run(RETRAIN_RULES, ["r8-qv-fp32"]) | PLAN_JOB | REPORT_JOBS


def test_data_and_model_settings_rerun_everything_downstream(study):
    workdir, config = study
    trained_and_base = per_run(RETRAIN_RULES, RUN_IDS) | {("evaluate", "base-fp32")}
    everything_after_data = trained_and_base | PLAN_JOB | REPORT_JOBS
    data_edit = copy.deepcopy(config)
    data_edit["dataset"]["validation_size"] = 20
    write_config(workdir, data_edit)
    assert planned_jobs(workdir) == {("prepare_data", None)} | everything_after_data

    model_edit = copy.deepcopy(config)
    model_edit["model"]["revision"] = "main"
    write_config(workdir, model_edit)
    checks = per_run(("check_run",), RUN_IDS)  # a run's check reads the model, not the data
    assert planned_jobs(workdir) == {("prepare_model", None), ("prepare_data", None)} | everything_after_data | checks


def test_evaluation_settings_rerun_evaluation_only(study):
    workdir, config = study
    config["evaluation"]["exact_match_examples"] = 6
    write_config(workdir, config)
    assert planned_jobs(workdir) == per_run(("evaluate",), (*RUN_IDS, "base-fp32")) | REPORT_JOBS


def test_report_settings_rerun_only_the_report(study):
    workdir, config = study
    before = snapshot(workdir)
    config["report"] = {"memory_budgets_gb": [1, 2, 4]}
    write_config(workdir, config)
    assert planned_jobs(workdir) == {("findings", None), ("all", None)}
    assert run_snakemake(workdir, "--cores", "2").returncode == 0
    assert snapshot(workdir) == before
    decision = pd.read_csv(workdir / "results/tables/derived/decision.csv")
    # Measured CPU RSS, then the planner's predicted GPU memory (a CPU study): the new budgets in each.
    assert list(decision["budget_gb"]) == [1, 2, 4] * 2
    assert list(decision["memory"]) == ["measured"] * 3 + ["predicted GPU"] * 3


def test_editing_a_rule_script_reruns_its_jobs_and_touch_accepts_it(study, tmp_path):
    workdir, _ = study
    # A private copy of the workflow, so the script edit stays in this test.
    workflow = tmp_path / "workflow"
    workflow.mkdir()
    for part in ("Snakefile", "rules", "scripts", "config", "report", "envs", "profiles"):
        source = REPO / part
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, workflow / part)
    with (workflow / "scripts/evaluate.py").open("a") as handle:
        handle.write("# an edit\n")
    snakefile = ("--snakefile", str(workflow / "Snakefile"))
    assert planned_jobs(workdir, *snakefile) == per_run(("evaluate",), (*RUN_IDS, "base-fp32")) | REPORT_JOBS
    changed = run_snakemake(workdir, "--list-changes", "code", *snakefile)
    assert "results/runs/custom/eval_metrics.json" in changed.stdout
    touched = run_snakemake(workdir, "--cores", "1", "--touch", *snakefile)
    assert touched.returncode == 0, touched.stderr[-2000:]
    assert planned_jobs(workdir, *snakefile) == set()


def test_turning_on_downstream_and_deployment_runs_only_their_jobs(study):
    workdir, config = study
    runs = {run for rule, run in planned_jobs(workdir, "--forcerun", "evaluate") if rule == "evaluate"}
    config["evaluation"].update(
        lm_eval={"tasks": ["lora_study_exact"]}, merge_check={"enabled": True}, serving={"enabled": True}
    )
    write_config(workdir, config)
    new_jobs = per_run(("downstream", "deploy"), runs) | {("lm_eval_tasks", None)}
    assert planned_jobs(workdir) == new_jobs | REPORT_JOBS


def mlflow_runs(workdir: Path) -> pd.DataFrame:
    """The study's runs as MLflow holds them (active runs of its experiment), read back by MLflow itself."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["lora-study"])


def test_editing_one_run_reruns_only_it_and_replaces_only_its_mlflow_run(study):
    """The study tracked to MLflow, then one run's settings edited: only that run retrains (every other run's
    files keep their bytes and mtimes) and only its MLflow run is replaced."""
    from mlflow import MlflowClient

    workdir, config = study
    config["tracking"] = {"mlflow": {}}  # the documented default: sqlite:///mlflow.db in the study directory
    write_config(workdir, config)
    assert planned_jobs(workdir) == {("track", None), ("all", None)}
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]

    table = pd.read_csv(workdir / "results/tables/runs.csv")
    logged = mlflow_runs(workdir).set_index("tags.lora_study.run_id")
    assert sorted(logged.index) == sorted(table["run_id"])
    for run in table.to_dict("records"):
        row = logged.loc[run["run_id"]]
        assert row["metrics.perplexity"] == pytest.approx(run["perplexity"])
        assert row["metrics.peak_memory_gb"] == pytest.approx(run["peak_memory_gb"])
        assert row["params.quantization"] == run["quantization"] and row["params.rank"] == str(run["rank"])
        assert row["tags.env.torch"] and row["tags.env.capability.summary"]
        assert row["tags.path.adapter"] == str(workdir / f"results/runs/{run['run_id']}/adapter")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    custom_id = logged.loc["custom", "run_id"]
    curve = pd.read_csv(workdir / "results/runs/custom/loss_curve.csv")
    history = client.get_metric_history(custom_id, "train_loss")
    assert [m.step for m in history] == list(curve["step"])
    assert [m.value for m in history] == pytest.approx(list(curve["loss"]))
    artifacts = {a.path for a in client.list_artifacts(custom_id, "report")}
    assert artifacts == {"report/findings.html", "report/findings.md"}
    record = json.loads((workdir / "results/tracking/mlflow.json").read_text())
    assert record["status"] == "ok" and {r["action"] for r in record["runs"].values()} == {"created"}

    # Retraining one run: it gets new numbers, the others stay the same MLflow runs, nothing is duplicated.
    before = snapshot(workdir)
    config["sweep"]["runs"][0]["training"]["learning_rate"] = 0.02
    write_config(workdir, config)
    assert planned_jobs(workdir) == per_run(RUN_RULES, ["custom"]) | PLAN_JOB | REPORT_JOBS | {("track", None)}
    assert run_snakemake(workdir, "--cores", "2").returncode == 0
    after = snapshot(workdir)
    untouched = [k for k in before if "/custom/" not in k]
    assert untouched and all(after[k] == before[k] for k in untouched)
    assert after["results/runs/custom/train_metrics.json"] != before["results/runs/custom/train_metrics.json"]
    again = mlflow_runs(workdir).set_index("tags.lora_study.run_id")
    assert sorted(again.index) == sorted(table["run_id"])
    table = pd.read_csv(workdir / "results/tables/runs.csv").set_index("run_id")
    assert again.loc["custom", "metrics.perplexity"] == pytest.approx(table.loc["custom", "perplexity"])
    assert again.loc["custom", "params.training.learning_rate"] == "0.02"
    others = [r for r in table.index if r != "custom"]
    assert (again.loc[others, "run_id"] == logged.loc[others, "run_id"]).all()
    record = json.loads((workdir / "results/tracking/mlflow.json").read_text())
    actions = {run_id: entry["action"] for run_id, entry in record["runs"].items()}
    assert actions == {**dict.fromkeys(others, "unchanged"), "custom": "replaced"}


def test_mlflow_tracking_failure_is_a_warning_not_a_failed_study(study):
    workdir, config = study
    config["tracking"] = {"mlflow": {"uri": "http://127.0.0.1:9"}}  # nothing listens there
    write_config(workdir, config)
    result = run_snakemake(workdir, "--cores", "2", extra_env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                                                "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((workdir / "results/tracking/mlflow.json").read_text())
    assert record["status"] == "failed" and record["error"] and record["runs"] == {}
    assert "MLflow tracking failed" in (workdir / "logs/track.log").read_text()
