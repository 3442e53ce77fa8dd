# Everything that reads the config lives here: validation, the run table, params.
import functools
import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

# The Snakefile imports the package from the checkout; jobs use the installed one
# (pip install -e . in the venv, or envs/study.yaml under --sdm conda).
sys.path.insert(0, workflow.basedir)

from lora_study.core import paths
from lora_study.study.config import ConfigError, canonical_json, check_local_sources, validate_config
from lora_study.study.budget import AUTO, auto_gpus, budget_verdict
from lora_study.questions import QUESTIONS
from lora_study.report.question import chart_captions
from lora_study.measure.downstream import local_task_problem
from lora_study.core.io import read_csv_rows
from lora_study.study.preflight import PreflightError, check_at_start
from lora_study.study.settings import compute_settings, evaluation_settings, forgetting_enabled
from lora_study.study.sweep import RUN_ID_PATTERN, all_evaluated, expand_study

try:
    validate_config(config)
    check_local_sources(config)
    RUNS = expand_study(config)
    if problem := local_task_problem(config):
        raise ConfigError(problem)
    EVALUATED = all_evaluated(config)
except ConfigError as error:
    raise WorkflowError(f"invalid config: {error}") from None
try:
    # A local model of a known family is checked from its config.json now; others by rule check_run.
    check_at_start(config["model"]["source"], RUNS.values())
except PreflightError as error:
    raise WorkflowError(f"runs that cannot start:\n{error}") from None


# A run id (the schema's pattern for named ids; generated ids fit it too): no "/", so {run} never spans folders.
# Not the alternation of the study's ids: Snakemake substitutes each rule's patterns, constraint text included,
# for every job, which made a 1,000-run dry run quadratic in the number of runs.
wildcard_constraints:
    run=RUN_ID_PATTERN,


def final_outputs():
    tracked = [paths.TRACKING_RECORD] if tracking_enabled() else []
    return [paths.RUNS_CSV, paths.RUNS_MD, paths.FINDINGS_MD, paths.FINDINGS_HTML, *tracked]


def tracking_enabled():
    return config["tracking"]["mlflow"] is not None


def tracking_params():
    """Each run's configuration as the tracker's parameters (method named even when it is plain LoRA)."""
    return canonical_json(
        {run_id: {**spec_params(run_id), "method": spec.method} for run_id, spec in EVALUATED.items()}
    )


@functools.cache
def spec_params(run_id):
    """One run's settings as params (computed once per run: a large sweep asks for them from several rules)."""
    return EVALUATED[run_id].as_params()


@functools.cache
def run_params_json(run_id):
    return canonical_json(spec_params(run_id))


def run_params(wildcards):
    """One run's full settings as canonical JSON, so only real edits rerun it."""
    return run_params_json(wildcards.run)


def train_gpus(wildcards):
    """Devices a run trains on (training.gpus; `auto`: chosen from its layout): Snakemake's gpu resource,
    SLURM's --gpus."""
    gpus = RUNS[wildcards.run].training.gpus
    return auto_layout(wildcards.run)[0] if gpus == AUTO else gpus


def train_inputs(wildcards):
    """A run's training inputs; a `gpus: auto` run's also its predictions per device count."""
    inputs = {
        "manifest": paths.MODEL_MANIFEST,
        "splits": paths.DATA_SPLITS,
        "check": paths.for_run(paths.RUN_CHECK, wildcards.run),
    }
    if RUNS[wildcards.run].training.gpus == AUTO:
        inputs["layout"] = paths.for_run(paths.RUN_LAYOUT, wildcards.run)
    return inputs


def auto_layout(run_id):
    """(devices, predictions) of an auto run under the configured budget. Before its layout exists (a dry run
    of a new study) one device; Snakemake evaluates params and resources again once a job's inputs exist. (Read
    by path, not from `input`: Snakemake does not record params derived from input, and this one must rerun.)"""
    path = paths.for_run(paths.RUN_LAYOUT, run_id)
    predictions = None
    if os.path.exists(path):
        with open(path) as handle:
            predictions = json.load(handle)
    return auto_gpus(predictions, config["plan"]), predictions


def compute_params(wildcards):
    spec = EVALUATED[wildcards.run]
    training = spec.training.to_dict() if spec.training else config["training"]
    return canonical_json(compute_settings(spec.quantization, training, config))


def memory_plan(wildcards):
    """The memory budget's verdict on this run ("null" unless it is skipped), for rerun decisions; an auto run's
    also its device count, so a budget edit that changes the count retrains it and one that does not, nothing.

    Read from the plan.csv on disk while the job graph is built: a run's
    prediction only changes with its own settings, model or data, which rerun
    it anyway, so a budget edit reruns just the runs whose verdict it flips.
    The train job plans itself again before loading anything and skips on
    that fresh verdict (train does not depend on the plan step: a replanned
    study must not retrain runs that did not change).
    """
    if RUNS[wildcards.run].training.gpus == AUTO:
        gpus, predictions = auto_layout(wildcards.run)
        return canonical_json({"gpus": gpus, **(budget_verdict(predictions, config["plan"], gpus) or {})})
    return canonical_json(budget_verdict(planned_rows().get(wildcards.run), config["plan"]))


@functools.cache
def planned_rows():
    """plan.csv as it is on disk when the job graph is built (read once, not once per run)."""
    return read_csv_rows(paths.PLAN_CSV, "run_id") if os.path.exists(paths.PLAN_CSV) else {}


def model_parameters():
    """The prepared model's parameter count (0 before prepare_model has run)."""
    if not os.path.exists(paths.MODEL_MANIFEST):
        return 0
    with open(paths.MODEL_MANIFEST) as handle:
        return json.load(handle).get("num_parameters", 0)


def anatomy_mem_mb(wildcards, attempt):
    """The base model in fp32 at most, twice for full fine-tuning (trained and base weights), plus 2 GB."""
    copies = 2 if RUNS[wildcards.run].is_full else 1
    return attempt * max(8000, int(model_parameters() * 4 * copies / 1e6) + 2000)


def anatomy_runtime(wildcards, attempt):
    """Minutes: full fine-tuning's update of every layer takes one SVD per layer of the whole model."""
    extra = model_parameters() // 100_000_000 if RUNS[wildcards.run].is_full else 0
    return attempt * (30 + extra)


def evaluation_inputs(wildcards):
    return {"manifest": paths.MODEL_MANIFEST, "splits": paths.DATA_SPLITS, **trained_inputs(wildcards)}


def evaluation_outputs():
    """Metrics, answers and per-row scores; with evaluation.forgetting also the per-row scores on general text."""
    outputs = {"metrics": paths.EVAL_METRICS, "predictions": paths.PREDICTIONS, "examples": paths.EXAMPLES}
    if forgetting_enabled(config):
        outputs["general"] = paths.GENERAL_EXAMPLES
    return outputs


def evaluate_params():
    return canonical_json(evaluation_settings(config))


def lm_eval_enabled():
    return bool(config["evaluation"]["lm_eval"]["tasks"])


def deploy_enabled():
    evaluation = config["evaluation"]
    return evaluation["merge_check"]["enabled"] or evaluation["serving"]["enabled"] or evaluation["save_merged"]


def trained_inputs(wildcards):
    """A trained run's adapter (or weights) and training status; nothing for a base model."""
    if EVALUATED[wildcards.run].is_baseline:
        return {}
    return {
        "adapter": paths.for_run(paths.ADAPTER, wildcards.run),
        "train_metrics": paths.for_run(paths.TRAIN_METRICS, wildcards.run),
    }


def downstream_inputs(wildcards):
    return {"manifest": paths.MODEL_MANIFEST, "tasks": paths.LM_EVAL_TASKS, **trained_inputs(wildcards)}


def deploy_inputs(wildcards):
    inputs = {"manifest": paths.MODEL_MANIFEST, "splits": paths.DATA_SPLITS, **trained_inputs(wildcards)}
    # The merge check compares with the unmerged adapter's per-row scores from its evaluation.
    inputs["examples"] = paths.for_run(paths.EXAMPLES, wildcards.run)
    return inputs


def deploy_outputs():
    outputs = {"record": paths.DEPLOY}
    if config["evaluation"]["save_merged"]:
        outputs["merged"] = directory(paths.MERGED)
    return outputs


def deploy_params(wildcards):
    """The settings deploy jobs measure with; only these (and the run) rerun them."""
    evaluation = config["evaluation"]
    keys = ("merge_check", "serving", "save_merged", "batch_size")
    return canonical_json({key: evaluation[key] for key in keys})


# One interpreter with the ML stack imported, each local job forked from it (lora_study.core.preload).
PRELOAD = {}


def start_preload():
    from snakemake.logging import logger
    from snakemake.settings.types import DeploymentMethod

    from lora_study.core import preload

    stack_jobs = sum(job.rule.name in preload.PRELOADED_RULES for job in workflow.dag.needrun_jobs())
    why_not = preload.reason_not_to_start(
        enabled=config["execution"]["preload"],
        device=config["execution"]["device"],
        local=workflow.local_exec and not workflow.remote_exec,
        isolated_envs=bool(workflow.deployment_settings.deployment_method),
        stack_jobs=stack_jobs,
    )
    if why_not:
        logger.info(f"preloaded interpreter: off ({why_not})")
        return
    server, socket_path = preload.start_server(Path.cwd(), Path(".snakemake") / "preload.log")
    PRELOAD.update(server=server, socket_path=socket_path)
    os.environ[preload.SOCKET_VARIABLE] = str(socket_path)
    os.environ[preload.PID_VARIABLE] = str(server.pid)
    logger.info(f"preloaded interpreter: {stack_jobs} jobs fork from one that imported the ML stack once")


def stop_preload():
    from lora_study.core import preload

    if PRELOAD:
        os.environ.pop(preload.SOCKET_VARIABLE, None)
        os.environ.pop(preload.PID_VARIABLE, None)
        preload.stop_server(PRELOAD.pop("server"), PRELOAD.pop("socket_path"))
