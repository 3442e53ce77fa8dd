"""The tiny study through profiles/slurm on a real SLURM cluster.

.ci/run starts a single-node cluster with two declared GPUs
(tests/slurm/start_cluster.sh); without a responding cluster these tests skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from conftest import REPO, require, run_snakemake, tiny_study_config


def cluster_is_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:  # a cluster that cannot answer in a minute is not up
        return False
    return states.returncode == 0 and "idle" in states.stdout


SLURM_ARGS = (
    "--workflow-profile", str(REPO / "profiles" / "slurm"),
    # This cluster has no accounting database: query squeue, not sacct.
    "--slurm-status-command", "squeue",
    # A local cluster answers at once: poll every second, not every 10 s, so each finished job is seen at once.
    "--slurm-init-seconds-before-status-checks", "1",
    "--seconds-between-status-checks", "1",
    "--slurm-no-account",
    "--verbose",
)  # fmt: skip


# Passes the checks (the model supports the kernel) but crashes in its job: flash-attn is not installed.
BROKEN_RUN = {
    "id": "broken",
    "rank": 4,
    "modules": ["q", "v"],
    "quantization": "nf4",
    "training": {"attn_implementation": "flash_attention_2"},
}
TRAINED = ("r4-qv-nf4", "r8-qv-nf4")
# One run on two devices (training.gpus: 2): one SLURM job asking for both, two processes inside it.
SHARDED_RUN = {"id": "sharded", "rank": 4, "modules": ["q", "v"], "quantization": "fp32", "training": {"gpus": 2}}


def slurm_config(model_dir, runs: list[dict]) -> dict:
    config = tiny_study_config(model_dir)
    # What is under test is how jobs reach the cluster: trained runs and no base-model evaluation.
    config["sweep"] = {"baseline": False, "grids": [{"rank": [4, 8], "modules": [["q", "v"]], "quantization": ["nf4"]}],
                       "runs": [*runs, SHARDED_RUN]}  # fmt: skip
    return config


@pytest.fixture(scope="module")
def slurm_study(tiny_llama, tmp_path_factory):
    """One study submitted twice: with a run that crashes in its job (the profile keeps going and retries it),
    then without that run, which leaves only the local report rules to do."""
    require(cluster_is_up(), "no SLURM cluster answers sinfo (.ci/run starts one: tests/slurm/start_cluster.sh)")
    workdir = tmp_path_factory.mktemp("slurm-study")
    (workdir / "config.yaml").write_text(yaml.safe_dump(slurm_config(tiny_llama, [BROKEN_RUN])))
    with_failure = run_snakemake(workdir, *SLURM_ARGS)
    (workdir / "config.yaml").write_text(yaml.safe_dump(slurm_config(tiny_llama, [])))
    completed = run_snakemake(workdir, *SLURM_ARGS)
    return workdir, with_failure, completed


def sbatch_calls(output: str, rule: str, run: str) -> list[str]:
    return [line for line in output.splitlines() if "sbatch call:" in line and f"rule_{rule}_wildcards_{run} " in line]


def test_every_train_job_is_its_own_slurm_job_with_one_gpu(slurm_study):
    workdir, with_failure, completed = slurm_study
    job_ids = {}
    for run in TRAINED:
        environment = json.loads((workdir / f"results/runs/{run}/train_metrics.json").read_text())["environment"]
        assert environment["slurm_job_id"], run
        assert environment["cuda_visible_devices"] in {"0", "1"}  # SLURM gave the job one declared GPU
        job_ids[run] = environment["slurm_job_id"]
    assert len(set(job_ids.values())) == 2
    output = with_failure.stdout + with_failure.stderr
    for run in TRAINED:
        calls = sbatch_calls(output, "train", run)
        assert len(calls) == 1 and "--gpus=1" in calls[0], output[-3000:]
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-5000:]
    assert not [line for line in completed.stdout.splitlines() if "sbatch call:" in line]  # nothing retrained
    table = pd.read_csv(workdir / "results/tables/runs.csv")
    assert list(table["run_id"]) == [*TRAINED, "sharded"]
    assert table["slurm_job_id"].notna().all()


def test_a_sharded_run_is_one_slurm_job_holding_both_its_gpus(slurm_study):
    workdir, with_failure, _ = slurm_study
    calls = sbatch_calls(with_failure.stdout + with_failure.stderr, "train", "sharded")
    assert len(calls) == 1 and "--gpus=2" in calls[0]
    metrics = json.loads((workdir / "results/runs/sharded/train_metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["gpus"] == 2 and len(metrics["memory"]["rank_peak_memory_gb"]) == 2
    assert metrics["environment"]["slurm_job_id"] and metrics["environment"]["cuda_visible_devices"] == "0,1"


def test_a_failing_job_is_retried_with_more_memory_and_reported_while_the_others_finish(slurm_study):
    workdir, with_failure, _ = slurm_study
    output = with_failure.stdout + with_failure.stderr
    assert with_failure.returncode != 0
    assert re.search(r"Error in rule train.*?broken", output, re.S), output[-4000:]
    assert "flash" in (workdir / "logs/train/broken.log").read_text()
    # profiles/slurm retries a failed job once, asking for twice the memory and time (attempt 2).
    first, retry = sbatch_calls(output, "train", "broken")
    assert "--mem 8000" in first and "-t 120" in first and "--mem 16000" in retry and "-t 240" in retry
    assert not (workdir / "results/runs/broken/train_metrics.json").exists()
    for run in TRAINED:
        assert (workdir / f"results/runs/{run}/eval_metrics.json").exists()
