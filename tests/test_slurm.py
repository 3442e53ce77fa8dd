"""The tiny study through profiles/slurm on a real SLURM cluster.

.ci/run starts a single-node cluster with one declared GPU
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

from conftest import REPO, run_snakemake, tiny_study_config

# Bounded in time: a hang fails the test instead of blocking CI.
SLURM_TIMEOUT_S = 900


def cluster_is_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return states.returncode == 0 and "idle" in states.stdout


pytestmark = pytest.mark.skipif(not cluster_is_up(), reason="no SLURM cluster (tests/slurm/start_cluster.sh)")

SLURM_ARGS = (
    "--workflow-profile", str(REPO / "profiles" / "slurm"),
    # This cluster has no accounting database: query squeue, not sacct.
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "5",
    "--slurm-no-account",
    "--verbose",
)  # fmt: skip


def slurm_config(model_dir) -> dict:
    config = tiny_study_config(model_dir)
    config["sweep"]["grids"] = [{"rank": [4, 8], "modules": [["q", "v"]], "quantization": ["nf4"]}]
    return config


@pytest.fixture(scope="module")
def slurm_study(tiny_llama, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm-study")
    (workdir / "config.yaml").write_text(yaml.safe_dump(slurm_config(tiny_llama)))
    result = run_snakemake(workdir, *SLURM_ARGS, timeout=SLURM_TIMEOUT_S)
    return workdir, result


def test_every_train_job_is_its_own_slurm_job_with_one_gpu(slurm_study):
    workdir, result = slurm_study
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    job_ids = {}
    for run in ("r4-qv-nf4", "r8-qv-nf4"):
        environment = json.loads((workdir / f"results/runs/{run}/train_metrics.json").read_text())["environment"]
        assert environment["slurm_job_id"], run
        assert environment["cuda_visible_devices"] == "0"  # SLURM gave the job the declared GPU
        job_ids[run] = environment["slurm_job_id"]
    assert len(set(job_ids.values())) == 2
    calls = [line for line in output.splitlines() if "sbatch call:" in line and "rule_train_" in line]
    assert len(calls) == 2, output[-3000:]
    assert all("--gpus=1" in call for call in calls)
    table = pd.read_csv(workdir / "results/tables/runs.csv")
    assert list(table["run_id"]) == ["base-nf4", "r4-qv-nf4", "r8-qv-nf4"]
    assert table["slurm_job_id"].iloc[1:].notna().all()


def test_a_failing_job_is_reported_while_the_others_finish(slurm_study):
    workdir, _ = slurm_study
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["sweep"]["runs"] = [
        # Passes the checks (the model supports the kernel) but crashes in its job: flash-attn is not installed.
        {
            "id": "broken",
            "rank": 4,
            "modules": ["q", "v"],
            "quantization": "nf4",
            "training": {"attn_implementation": "flash_attention_2"},
        },
        {"id": "healthy", "rank": 2, "modules": ["q", "v"], "quantization": "nf4"},
    ]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, *SLURM_ARGS, timeout=SLURM_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(r"Error in rule train.*?broken", output, re.S), output[-4000:]
    assert "flash" in (workdir / "logs/train/broken.log").read_text()
    assert (workdir / "results/runs/healthy/eval_metrics.json").exists()
    assert not (workdir / "results/runs/broken/train_metrics.json").exists()
