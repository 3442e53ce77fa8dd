"""Experiment tracking: every run of the study logged to MLflow from the result files.

The result files stay the source of truth; MLflow is a view of them. One MLflow run per study run, found
again by its `lora_study.run_id` tag, so a rerun updates it instead of adding another:

- nothing it would log changed (same fingerprint): left as it is, only the report artifact refreshed;
- its metrics or tags changed but not its configuration or loss curve (re-evaluated): updated in place,
  the new values logged as each metric's latest;
- its configuration or loss curve changed (retrained under the same run id): MLflow does not allow a
  logged parameter to change, so the old MLflow run is deleted (MLflow keeps it in its trash) and a new one
  logged with the same tag.

Any failure is logged as a warning and written to the tracking record; it never fails the study.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from lora_study.core import paths
from lora_study.core.io import atomic_path

log = logging.getLogger("lora_study")

RUN_ID_TAG = "lora_study.run_id"
FINGERPRINT_TAG = "lora_study.fingerprint"
TRAINING_TAG = "lora_study.training_fingerprint"  # configuration + loss curve: what a retraining changes
LOSS_METRIC = "train_loss"
DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "lora-study"
# The libraries whose versions each run records (the tracking job shares the study's environment).
VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "lm-eval", "snakemake")
# runs.csv columns that describe where and on what a run ran: tags env.<column>, not metrics.
ENVIRONMENT_PREFIXES = (
    "capability.", "hostname", "device", "slurm_", "cuda_visible_devices", "gpu_slot", "torch_threads",
    "eval_hostname", "eval_slurm", "eval_cuda_visible", "eval_gpu_slot", "process", "eval_process",
)  # fmt: skip
MAX_BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits


@dataclass(frozen=True)
class TrackingSettings:
    """`tracking.mlflow` of the config; None there: tracking off."""

    uri: str = DEFAULT_URI
    experiment: str = DEFAULT_EXPERIMENT

    @classmethod
    def from_config(cls, tracking: dict[str, Any] | None) -> TrackingSettings | None:
        settings = (tracking or {}).get("mlflow")
        if settings is None:
            return None
        return cls(uri=settings.get("uri", DEFAULT_URI), experiment=settings.get("experiment", DEFAULT_EXPERIMENT))


@dataclass
class RunRecord:
    """What one study run is in MLflow and what the last tracking did to it."""

    mlflow_run_id: str
    action: str  # created | updated | replaced | unchanged


@dataclass
class TrackingRecord:
    """results/tracking/mlflow.json: where the runs went, or why they did not."""

    uri: str
    experiment: str
    status: str = "ok"
    error: str = ""
    experiment_id: str = ""
    runs: dict[str, RunRecord] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunEntry:
    """Everything logged for one study run, as MLflow will hold it."""

    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    loss_curve: list[tuple[int, float]]

    def fingerprint(self, *, training_only: bool = False) -> str:
        content = {"params": self.params, "loss": self.loss_curve}
        if not training_only:
            content |= {"metrics": self.metrics, "tags": self.tags}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as dotted keys with text values (MLflow parameters)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        elif isinstance(value, list | tuple):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = "" if value is None else str(value)
    return flat


def metric_key(column: str) -> str:
    """A runs.csv column as an MLflow metric name (MLflow allows letters, digits and _ - . space : /)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", column)


def _is_environment(column: str) -> bool:
    return column.startswith(ENVIRONMENT_PREFIXES)


def _number(value: Any) -> float | None:
    """A finite number (not a flag) or None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def run_entries(
    runs: pd.DataFrame, run_configs: dict[str, dict[str, Any]], curves: pd.DataFrame, workdir: Path
) -> list[RunEntry]:
    """One entry per row of runs.csv: its configuration (parameters), every numeric column (metrics), the rest
    and its environment (tags), the paths of its files (tags) and its loss curve (a step metric)."""
    versions = {f"env.{name}": version for name, version in library_versions().items()}
    entries = []
    for row in runs.to_dict("records"):
        run_id = str(row["run_id"])
        metrics, tags = {}, {RUN_ID_TAG: run_id, **versions}
        params = flatten(run_configs.get(run_id, {}))
        for column, value in row.items():
            # Configuration columns are the run's parameters, not metrics.
            if column == "run_id" or column in params or (isinstance(value, float) and math.isnan(value)):
                continue
            number = _number(value)
            if _is_environment(column):
                tags[f"env.{column}"] = str(value)
            elif number is not None:
                metrics[metric_key(column)] = number
            else:
                tags[f"runs.{column}"] = str(value)
        tags |= {f"path.{name}": str(workdir / paths.for_run(template, run_id)) for name, template in (
            ("adapter", paths.ADAPTER), ("train_metrics", paths.TRAIN_METRICS), ("eval_metrics", paths.EVAL_METRICS),
            ("examples", paths.EXAMPLES), ("loss_curve", paths.LOSS_CURVE))}  # fmt: skip
        own = curves[curves["run_id"] == run_id].sort_values("step")
        loss = [(int(step), float(value)) for step, value in zip(own["step"], own["loss"], strict=True)]
        entries.append(RunEntry(run_id, params, metrics, tags, loss))
    return entries


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _log_entry(client, mlflow_run_id: str, entry: RunEntry, *, with_params: bool, with_loss: bool) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    tags = {**entry.tags, FINGERPRINT_TAG: entry.fingerprint(), TRAINING_TAG: entry.fingerprint(training_only=True)}
    metrics = [Metric(key, value, now, 0) for key, value in entry.metrics.items()]
    if with_loss:
        metrics += [Metric(LOSS_METRIC, loss, now, step) for step, loss in entry.loss_curve]
    for batch in _chunks(metrics, MAX_BATCH["metrics"]):
        client.log_batch(mlflow_run_id, metrics=batch)
    if with_params:
        for batch in _chunks([Param(k, v) for k, v in entry.params.items()], MAX_BATCH["params"]):
            client.log_batch(mlflow_run_id, params=batch)
    for batch in _chunks([RunTag(k, v) for k, v in tags.items()], MAX_BATCH["tags"]):
        client.log_batch(mlflow_run_id, tags=batch)


def _experiment_id(client, settings: TrackingSettings) -> str:
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(settings.experiment, artifact_location=_artifact_location(settings.uri))


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside its database file (mlartifacts/); others: MLflow's default."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.resolve().parent / "mlartifacts").as_uri()


def existing_runs(client, experiment_id: str) -> dict[str, Any]:
    """Active MLflow runs of the experiment by their study run id."""
    found = {}
    page_token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=page_token)
        for run in page:
            if RUN_ID_TAG in run.data.tags:
                found[run.data.tags[RUN_ID_TAG]] = run
        page_token = page.token
        if not page_token:
            return found


def track_entry(client, experiment_id: str, entry: RunEntry, existing, report_files: list[Path]) -> RunRecord:
    """Create, update in place, replace or leave the MLflow run of one study run."""
    if existing is not None and existing.data.tags.get(FINGERPRINT_TAG) == entry.fingerprint():
        action, mlflow_run_id = "unchanged", existing.info.run_id
    elif existing is not None and existing.data.tags.get(TRAINING_TAG) == entry.fingerprint(training_only=True):
        action, mlflow_run_id = "updated", existing.info.run_id
        client.update_run(mlflow_run_id, status="RUNNING")
        _log_entry(client, mlflow_run_id, entry, with_params=False, with_loss=False)
    else:
        if existing is not None:
            client.delete_run(existing.info.run_id)
        action = "created" if existing is None else "replaced"
        mlflow_run_id = client.create_run(experiment_id, run_name=entry.run_id).info.run_id
        _log_entry(client, mlflow_run_id, entry, with_params=True, with_loss=True)
    for report in report_files:
        client.log_artifact(mlflow_run_id, str(report), artifact_path="report")
    client.set_terminated(mlflow_run_id, "FINISHED")
    return RunRecord(mlflow_run_id, action)


def track_study(
    settings: TrackingSettings,
    runs: pd.DataFrame,
    run_configs: dict[str, dict[str, Any]],
    curves: pd.DataFrame,
    report_files: list[Path],
    workdir: Path,
) -> TrackingRecord:
    """Log every run of the study; a failure is a warning and the record's status, never an exception."""
    record = TrackingRecord(uri=settings.uri, experiment=settings.experiment)
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=settings.uri)
        record.experiment_id = _experiment_id(client, settings)
        known = existing_runs(client, record.experiment_id)
        for entry in run_entries(runs, run_configs, curves, workdir):
            record.runs[entry.run_id] = track_entry(
                client, record.experiment_id, entry, known.get(entry.run_id), report_files
            )
            log.info("mlflow: %s %s (%s)", entry.run_id, record.runs[entry.run_id].action,
                     record.runs[entry.run_id].mlflow_run_id)  # fmt: skip
    except Exception as error:
        record.status, record.error = "failed", f"{type(error).__name__}: {error}"
        log.warning("MLflow tracking failed (the study's results are complete; rerun with -R track): %s", record.error)
    return record


def write_record(record: TrackingRecord, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record.to_dict(), indent=2) + "\n")
