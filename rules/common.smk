# Everything that reads the config lives here: validation, the run table, params.
import re
import sys

from snakemake.exceptions import WorkflowError

# The Snakefile imports the package from the checkout; jobs use the installed one
# (pip install -e . in the venv, or envs/study.yaml under --sdm conda).
sys.path.insert(0, workflow.basedir)

from lora_study import paths
from lora_study.config import ConfigError, canonical_json, check_local_sources, validate_config
from lora_study.io import read_csv_rows
from lora_study.sweep import all_evaluated, expand_study

try:
    validate_config(config)
    check_local_sources(config)
    RUNS = expand_study(config)
    EVALUATED = all_evaluated(config)
except ConfigError as error:
    raise WorkflowError(f"invalid config: {error}") from None


wildcard_constraints:
    run="|".join(map(re.escape, EVALUATED)),


def final_outputs():
    return [paths.RUNS_CSV, paths.RUNS_MD, paths.FINDINGS_MD, paths.FINDINGS_HTML]


def run_params(wildcards):
    """One run's full settings as canonical JSON, so only real edits rerun it."""
    return canonical_json(EVALUATED[wildcards.run].as_params())


def compute_params(wildcards):
    """Settings evaluation shares with training: how the base model is computed."""
    spec = EVALUATED[wildcards.run]
    training = spec.training or config["training"]
    keys = ("compute_dtype", "attn_implementation")
    return canonical_json({key: training[key] for key in keys})


def memory_plan(wildcards):
    """The plan's verdict for a run that a memory budget skips; "null" for every other run.

    Only a skip (and its numbers) enters the train job's params, so changing the
    budget reruns just the runs whose verdict changes.
    """
    table = checkpoints.plan.get().output.table
    row = read_csv_rows(table, "run_id")[wildcards.run]
    if row["skip"] != "True":
        return "null"
    verdict = {"skip": True, "predicted_gb": float(row["predicted_gb"]), "budget_gb": float(row["budget_gb"])}
    return canonical_json({**verdict, "plan_device": row["plan_device"]})


def evaluation_inputs(wildcards):
    inputs = {"manifest": paths.MODEL_MANIFEST, "splits": paths.DATA_SPLITS}
    if not EVALUATED[wildcards.run].is_baseline:
        inputs["adapter"] = paths.for_run(paths.ADAPTER, wildcards.run)
        inputs["train_metrics"] = paths.for_run(paths.TRAIN_METRICS, wildcards.run)
    return inputs
