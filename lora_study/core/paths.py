"""Every result path of the workflow, defined once (rules and scripts import these)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESULTS = "results"
LOGS = "logs"

MODEL_DIR = f"{RESULTS}/model"
MODEL_MANIFEST = f"{MODEL_DIR}/model.json"
# One run's targets, checked on the prepared model before it trains.
RUN_CHECK = f"{RESULTS}/checks/{{run}}.json"
# A `training.gpus: auto` run's predicted peak per device on 1, 2, 4 and 8 devices (its count is chosen from it).
RUN_LAYOUT = f"{RESULTS}/layouts/{{run}}.json"
DATA_DIR = f"{RESULTS}/data"
DATA_SUMMARY = f"{DATA_DIR}/summary.json"
DATA_SPLITS = f"{DATA_DIR}/splits"

RUN_DIR = f"{RESULTS}/runs/{{run}}"
ADAPTER = f"{RUN_DIR}/adapter"
TRAIN_METRICS = f"{RUN_DIR}/train_metrics.json"
LOSS_CURVE = f"{RUN_DIR}/loss_curve.csv"
EVAL_METRICS = f"{RUN_DIR}/eval_metrics.json"
PREDICTIONS = f"{RUN_DIR}/predictions.jsonl"
# Per validation row: summed NLL, tokens, exact-match hit (paired comparisons between runs).
EXAMPLES = f"{RUN_DIR}/examples.csv"
GENERAL_EXAMPLES = f"{RUN_DIR}/general.csv"  # per-row NLL on the general text (evaluation.forgetting)
HANDOFF = f"{RUN_DIR}/evaluated_in_training"  # lora_study.measure.handoff: not a rule output
# Singular values of each layer's learned update (merged minus base weight).
ANATOMY = f"{RUN_DIR}/anatomy.csv"
# lm-evaluation-harness scores and per-document scores; deployment (merge check, serving cost).
DOWNSTREAM = f"{RUN_DIR}/downstream.json"
DOWNSTREAM_SAMPLES = f"{RUN_DIR}/downstream_samples.csv"
DEPLOY = f"{RUN_DIR}/deploy.json"
MERGED = f"{RUN_DIR}/merged"
# The study's own exact-answer prompts as lm-eval task files, and every configured task checked.
LM_EVAL_DIR = f"{RESULTS}/lm_eval"
LM_EVAL_TASKS = f"{LM_EVAL_DIR}/tasks"
LM_EVAL_CHECK = f"{LM_EVAL_DIR}/check.json"
# Outside the run's outputs: Snakemake deletes a failed job's outputs, a checkpoint must survive.
CHECKPOINT = f"{RESULTS}/checkpoints/{{run}}"

TABLES = f"{RESULTS}/tables"
RUNS_CSV = f"{TABLES}/runs.csv"
RUNS_MD = f"{TABLES}/runs.md"
CONFIGS_CSV = f"{TABLES}/configs.csv"
CONFIGS_MD = f"{TABLES}/configs.md"
LOSS_CURVES_CSV = f"{TABLES}/loss_curves.csv"
EXAMPLES_CSV = f"{TABLES}/examples.csv"
GENERAL_EXAMPLES_CSV = f"{TABLES}/general_examples.csv"
ANATOMY_CSV = f"{TABLES}/anatomy.csv"
DOWNSTREAM_CSV = f"{TABLES}/downstream.csv"
DOWNSTREAM_SAMPLES_CSV = f"{TABLES}/downstream_samples.csv"
DEPLOY_CSV = f"{TABLES}/deploy.csv"
PLAN_CSV = f"{TABLES}/plan.csv"
PLAN_MD = f"{TABLES}/plan.md"
DERIVED_TABLES = f"{TABLES}/derived"
CHARTS = f"{RESULTS}/charts"
REPORT_DIR = f"{RESULTS}/report"
FINDINGS_MD = f"{REPORT_DIR}/findings.md"
FINDINGS_HTML = f"{REPORT_DIR}/findings.html"
# Where tracking logged each run (MLflow run ids), or why it could not.
TRACKING_RECORD = f"{RESULTS}/tracking/mlflow.json"

BENCHMARKS = "benchmarks"

TRAIN_LOG = f"{LOGS}/train/{{run}}.log"
EVAL_LOG = f"{LOGS}/evaluate/{{run}}.log"
ANATOMY_LOG = f"{LOGS}/anatomy/{{run}}.log"
DOWNSTREAM_LOG = f"{LOGS}/downstream/{{run}}.log"
DEPLOY_LOG = f"{LOGS}/deploy/{{run}}.log"
TRACK_LOG = f"{LOGS}/track.log"


def for_run(template: str, run_id: str) -> str:
    return template.format(run=run_id)


def benchmark(rule: str, per_run: bool = False) -> str:
    """Snakemake's per-job wall time / RSS record (benchmark: directive)."""
    return f"{BENCHMARKS}/{rule}/{{run}}.tsv" if per_run else f"{BENCHMARKS}/{rule}.tsv"


@dataclass(frozen=True)
class EvalOutputs:
    """Where an evaluation writes: metrics, the scored prompts' answers, and per-row scores."""

    metrics: Path
    predictions: Path
    examples: Path
    general: Path | None = None  # per-row NLL on the general text, when evaluation.forgetting is on

    def by_name(self) -> dict[str, Path]:
        """Each output under its file name in the rule (the names a hand-off stores them under)."""
        named = {EVAL_METRICS: self.metrics, PREDICTIONS: self.predictions, EXAMPLES: self.examples,
                 GENERAL_EXAMPLES: self.general}  # fmt: skip
        return {Path(template).name: path for template, path in named.items() if path is not None}
