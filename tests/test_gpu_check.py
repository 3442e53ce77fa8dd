"""bench/gpu_check.sh on CPU with a tiny Phi-architecture model: the whole path runs."""

from __future__ import annotations

import json
import math
import subprocess

import pandas as pd

from conftest import REPO, run_guarded


def run_check(*args: str) -> subprocess.CompletedProcess:
    return run_guarded(["bash", str(REPO / "bench/gpu_check.sh"), "--tiny", *args])


def test_gpu_check_runs_on_cpu_with_a_tiny_model(tmp_path):
    result = run_check("--steps", "2", "--configs", "2", "--out", str(tmp_path / "check.md"))
    assert result.returncode == 0, result.stderr[-3000:]
    everything = pd.read_csv(tmp_path / "check.csv")
    table = everything[everything["check"] == "grid"]
    assert list(table["run_id"]) == ["r4-qkvo-nf4", "r8-qkvo-nf4"]
    assert (table["status"] == "ok").all() and (table["memory_kind"] == "cpu_peak_rss").all()
    # After the grid: two concurrent jobs, a run under a memory cap, and the first configuration on one device and
    # sharded over two (here two CPU processes), each a row (a failure included).
    assert list(everything["check"].iloc[2:]) == ["concurrent 1 of 2", "concurrent 2 of 2", "memory cap 0.001 GB",
                                                  "one device (adamw)", "sharded over 2 devices"]  # fmt: skip
    assert (everything["status"].iloc[[2, 3, 5, 6]] == "ok").all()
    sharded = everything.iloc[6]
    peaks = json.loads(sharded["rank_peak_memory_gb"])
    assert len(peaks) == 2 and sharded["peak_memory_gb"] == max(peaks)
    assert float(sharded["loss_vs_one_device"].split()[0]) < 1e-2  # bf16 or fp32 sums in another order
    for column in ("peak_memory_gb", "planned_cuda_gb", "planned_cpu_gb", "useful_tokens_per_s"):
        assert table[column].map(math.isfinite).all() and (table[column] > 0).all(), column
    assert table["trainable_params"].iloc[1] == 2 * table["trainable_params"].iloc[0]
    text = (tmp_path / "check.md").read_text()
    assert "Batch 2 x accumulation 4, 512 tokens per row" in text and "optimizer=paged_adamw_8bit" in text
    assert "concurrent jobs: no GPU here, nothing to tell apart" in text and "resolved formats: nf4->" in text


def test_plan_only_predicts_less_memory_with_gradient_checkpointing(tmp_path):
    result = run_check("--plan-only", "--out", str(tmp_path / "plan.md"))
    assert result.returncode == 0, result.stderr[-3000:]
    plan = pd.read_csv(tmp_path / "plan.csv")
    with_gc = plan[plan["gradient_checkpointing"]].set_index("run_id")["activations_gb"]
    without = plan[~plan["gradient_checkpointing"]].set_index("run_id")["activations_gb"]
    assert (with_gc < without).all() and len(with_gc) == 10
