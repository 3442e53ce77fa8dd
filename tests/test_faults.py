"""Faults a memory study must survive: out of memory, a diverging run, interruption.

Real Snakemake runs of the tiny Llama on CPU; faults are real (an address-space
cap the run cannot allocate past, a learning rate that diverges, SIGTERM and
SIGKILL sent to the training process).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from conftest import (
    COMMAND_HANG_GUARD_S,
    JOB_THREADS,
    prepared_inputs,
    run_snakemake,
    snakemake_command,
    snakemake_env,
    tiny_study_config,
    train_and_evaluate,
)
from lora_study.core.io import atomic_path, write_json
from lora_study.training.checkpoints import Checkpointer, Progress
from lora_study.training.failures import is_out_of_memory


def write_config(workdir: Path, config: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def small_config(model_dir: Path, runs: list[dict], **training) -> dict:
    config = tiny_study_config(model_dir)
    config["sweep"] = {"baseline": False, "grids": [], "runs": runs}
    config["evaluation"]["exact_match_examples"] = 0
    config["training"].update(training)
    return config


def read_metrics(workdir: Path, run_id: str, name: str) -> dict:
    return json.loads((workdir / f"results/runs/{run_id}/{name}.json").read_text())


def test_out_of_memory_is_a_result_and_a_failure_fails_only_its_run(tiny_llama, tmp_path):
    def run(run_id: str, quantization: str = "fp32", **training) -> dict:
        return {"id": run_id, "rank": 4, "modules": ["q", "v"], "quantization": quantization, "training": training}

    runs = [
        run("fits"),
        # A machine with (almost) no free memory: the run cannot even load the model.
        run("tight", memory_limit_gb=0.001),
        # A real failure: fp16 activations overflow, so the loss is NaN. (A job that crashes outright, on a
        # missing attention kernel, is tests/test_slurm.py's failing job.)
        run("diverges", quantization="fp16", learning_rate=1e30),
    ]
    write_config(tmp_path, small_config(tiny_llama, runs))
    first = run_snakemake(tmp_path, "--cores", "2", "--keep-going")
    assert first.returncode != 0
    assert "the run diverged" in (tmp_path / "logs/train/diverges.log").read_text()
    assert not (tmp_path / "results/runs/diverges/train_metrics.json").exists()
    assert read_metrics(tmp_path, "fits", "eval_metrics")["status"] == "ok"

    tight = read_metrics(tmp_path, "tight", "train_metrics")
    assert tight["status"] == "oom"
    assert tight["failure"]["phase"] in ("load", "train") and tight["failure"]["memory_limit_gb"] == 0.001
    assert tight["failure"]["in_use_cpu_rss_gb"] > 0
    assert read_metrics(tmp_path, "tight", "eval_metrics")["status"] == "oom"
    assert "recorded as status 'oom'" in (tmp_path / "logs/train/tight.log").read_text()

    # Without the diverging run the study completes, and the out-of-memory run is reported, not dropped.
    write_config(tmp_path, small_config(tiny_llama, runs[:2]))
    second = run_snakemake(tmp_path, "--cores", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results/tables/runs.csv").set_index("run_id")
    assert table.loc["tight", "status"] == "oom" and pd.isna(table.loc["tight", "perplexity"])
    assert table.loc["fits", "status"] == "ok" and table.loc["fits", "perplexity"] > 1
    findings = (tmp_path / "results/report/findings.md").read_text()
    assert "tight does not fit (out of memory)" in findings


def _train_process(snakemake: subprocess.Popen) -> psutil.Process | None:
    for child in psutil.Process(snakemake.pid).children(recursive=True):
        try:
            if any("train.py" in part for part in child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _wait_for_checkpoint(log: Path, beyond: int, process: subprocess.Popen) -> int:
    """The step of the first checkpoint after `beyond` that the job's log reports."""
    deadline = time.monotonic() + COMMAND_HANG_GUARD_S
    while time.monotonic() < deadline:
        steps = [int(s) for s in re.findall(r"checkpoint saved at step (\d+)", log.read_text())] if log.exists() else []
        if later := [s for s in steps if s > beyond]:
            return later[0]
        if process.poll() is not None:
            raise AssertionError(f"snakemake ended before a checkpoint after step {beyond} appeared in {log}")
        time.sleep(0.05)
    pytest.fail(f"hang guard: no checkpoint after step {beyond} in {log} within {COMMAND_HANG_GUARD_S} s", False)


def _interrupt(workdir: Path, beyond: int, kill_signal: signal.Signals) -> int:
    """Start the study, send `kill_signal` to its training job once it has checkpointed after step `beyond`,
    and return the step the job's checkpoint holds."""
    snakemake = subprocess.Popen(
        snakemake_command(workdir, "--cores", "2"),
        cwd=workdir,
        env=snakemake_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_checkpoint(workdir / "logs/train/long.log", beyond, snakemake)
        _train_process(snakemake).send_signal(kill_signal)
        assert snakemake.wait(timeout=COMMAND_HANG_GUARD_S) != 0
    finally:
        snakemake.kill()
    assert not (workdir / "results/runs/long/train_metrics.json").exists()
    return json.loads((workdir / "results/checkpoints/long/progress.json").read_text())["progress"]["step"]


RESUME_RUN = [{"id": "long", "rank": 4, "modules": ["q", "k", "v", "o"], "quantization": "fp32"}]
RESUME_TRAINING = {"max_steps": 240, "log_every": 20, "lora_dropout": 0.1}


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tmp_path_factory) -> float:
    """The run's perplexity trained and evaluated without interruption, by the functions the workflow's jobs
    call, on as many threads as the workflow gives a job here."""
    from lora_study.study.sweep import expand_study

    out = tmp_path_factory.mktemp("uninterrupted")
    config, manifest, splits = prepared_inputs(tiny_llama, small_config(tiny_llama, RESUME_RUN, **RESUME_TRAINING), out)
    return train_and_evaluate(expand_study(config)["long"], config, manifest, splits, out, JOB_THREADS).perplexity


def test_interrupted_training_resumes_to_the_same_result(tiny_llama, tmp_path, uninterrupted):
    """Stopped twice: by SIGTERM (what SLURM sends at a time limit: the job saves where it is), then by
    SIGKILL (nothing saved: the last periodic checkpoint counts); it ends where the uninterrupted run ends."""
    config = small_config(tiny_llama, RESUME_RUN, **RESUME_TRAINING)
    config["execution"] = {"checkpoint_every": 40}
    write_config(tmp_path, config)
    train_log = tmp_path / "logs/train/long.log"
    started = time.monotonic()

    terminated_at = _interrupt(tmp_path, beyond=40, kill_signal=signal.SIGTERM)
    assert 80 <= terminated_at < 240
    assert f"SIGTERM received: stopped after step {terminated_at}" in train_log.read_text()

    killed_at = _interrupt(tmp_path, beyond=terminated_at, kill_signal=signal.SIGKILL)
    assert f"resuming from the checkpoint at step {terminated_at}" in train_log.read_text()
    assert terminated_at < killed_at < 240 and killed_at % 40 == 0  # a periodic checkpoint

    resumed = run_snakemake(tmp_path, "--cores", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    wall_s = time.monotonic() - started
    assert f"resuming from the checkpoint at step {killed_at}" in train_log.read_text()
    assert read_metrics(tmp_path, "long", "train_metrics")["resumed_from_step"] == killed_at
    evaluation = read_metrics(tmp_path, "long", "eval_metrics")
    assert evaluation["perplexity"] == pytest.approx(uninterrupted, abs=1e-5)
    assert not (tmp_path / "results/checkpoints/long").exists()  # removed once the run's outputs exist
    print(f"SIGTERM at step {terminated_at}, SIGKILL at step {killed_at}, resumed: {wall_s:.1f} s")


def test_a_checkpoint_from_other_settings_is_not_resumed(tmp_path):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    Checkpointer(tmp_path / "ckpt", "settings-a", 1).save(model, optimizer, scheduler, Progress(step=3))
    assert Checkpointer(tmp_path / "ckpt", "settings-a", 1).restore(model, optimizer, scheduler).step == 3
    assert Checkpointer(tmp_path / "ckpt", "settings-b", 1).restore(model, optimizer, scheduler) is None
    assert not (tmp_path / "ckpt").exists()


def test_a_failed_write_leaves_neither_the_target_nor_a_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"half": ')
        raise RuntimeError("job killed mid-write")
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"complete": True})
    assert json.loads(target.read_text()) == {"complete": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_readers_never_see_a_half_written_file(tmp_path):
    """One process rewrites a large file while another keeps parsing it."""
    target = tmp_path / "table.json"
    write_json(target, {"rows": list(range(200_000))})
    writer = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys; from lora_study.core.io import write_json\n"
            "for i in range(40): write_json(sys.argv[1], {'rows': list(range(200_000 + i))})",
            str(target),
        ]
    )  # fmt: skip
    reads = 0
    while writer.poll() is None:
        assert len(json.loads(target.read_text())["rows"]) >= 200_000
        reads += 1
    assert writer.returncode == 0 and reads > 0


def test_what_counts_as_out_of_memory():
    import errno

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    wrapped = ValueError("loading failed")
    wrapped.__cause__ = MemoryError()
    assert is_out_of_memory(wrapped)
    # A thread that cannot start is an allocation failure only under a memory cap.
    thread = RuntimeError("can't start new thread")
    assert is_out_of_memory(thread, memory_capped=True) and not is_out_of_memory(thread)
    # oneDNN cannot map the memory for a kernel it generates: under a cap that is the cap, without one a bug.
    primitive = RuntimeError("could not create a primitive")
    assert is_out_of_memory(primitive, memory_capped=True) and not is_out_of_memory(primitive)
    assert not is_out_of_memory(FloatingPointError("training loss is nan at step 2"))
    assert not is_out_of_memory(ValueError("target modules ['x'] not found"))
    # cuBLAS says it with a status: an allocation that failed, or a handle it had no memory to create.
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtMatmul(...)`"))
    assert is_out_of_memory(
        RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`")
    )
    assert not is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx`"))


def test_out_of_memory_in_a_part_of_a_job_is_recorded_and_the_job_goes_on():
    import torch

    from lora_study.training.failures import oom_as_data

    record: dict = {}
    with oom_as_data(record, "merged forms"):
        torch.empty(2**62, dtype=torch.uint8)  # a real allocation no machine grants
    assert set(record["oom"]) == {"merged forms"} and "allocate" in record["oom"]["merged forms"]
    with pytest.raises(ValueError, match="not a memory problem"), oom_as_data(record, "serving"):
        raise ValueError("not a memory problem")
    assert "serving" not in record["oom"]


def test_lm_eval_that_does_not_fit_is_recorded_and_reported():
    import pandas as pd
    import torch

    from lora_study.analysis.deployment import deploy_frame, downstream_frame
    from lora_study.measure.downstream import LmEvalSettings, _scores_or_oom
    from lora_study.questions.unmeasured import oom_finding

    def load_too_large():
        return torch.empty(2**62, dtype=torch.uint8)

    record: dict = {"run_id": "r4-qv-nf4", "status": "ok", "scores": []}
    settings = LmEvalSettings(("local",), 0, None, 16)
    scores, samples = _scores_or_oom(record, load_too_large, None, settings, None, True, None)
    assert scores == [] and samples.empty and record["status"] == "oom" and "load" in record["oom"]
    deploy = {"run_id": "r8-qv-nf4", "serving": {"unmerged": {"ms_per_token_b1": 5.0}}, "merge": {},
              "oom": {"merged forms": "DefaultCPUAllocator: can't allocate memory"}}  # fmt: skip
    ids = {"r4-qv-nf4": "r4-qv-nf4", "r8-qv-nf4": "r8-qv-nf4"}
    sentence = oom_finding(downstream_frame([record], ids), deploy_frame([deploy], ids))
    assert sentence.startswith("Did not fit in memory (recorded as data; the rest of the study was measured): ")
    assert "lm-eval of r4-qv-nf4: load: " in sentence and "deploy of r8-qv-nf4 (merged forms): " in sentence
    assert oom_finding(pd.DataFrame(columns=["oom"]), None) is None


def test_a_weight_conversion_that_ran_out_of_memory_is_out_of_memory():
    """transformers 5 reports a failed conversion (4-bit quantization while loading) in a warning-level load
    report and raises a RuntimeError without its cause; jobs silence those warnings. The loader recovers it."""
    import logging

    from lora_study.training.loading import conversion_failures_as_errors

    report = logging.getLogger("transformers.utils.loading_report")
    logging.getLogger("transformers").setLevel(logging.ERROR)  # as every job sets it
    oom_line = ("model.layers.1.mlp.fc2.weight | CONVERSION | [enforce fail at alloc_cpu.cpp:127] "
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 65536")  # fmt: skip
    see_report = "We encountered some issues during automatic conversion of the weights. See the report."
    caught = None
    try:
        with conversion_failures_as_errors():
            report.warning("LOAD REPORT\n" + oom_line)
            raise RuntimeError(see_report)
    except MemoryError as error:
        caught = error
    assert caught is not None and "can't allocate memory" in str(caught) and is_out_of_memory(caught)
    failure = None
    try:
        with conversion_failures_as_errors():
            report.warning("LOAD REPORT\nx.weight | CONVERSION | ValueError: bad scale")
            raise RuntimeError(see_report)
    except RuntimeError as error:
        failure = error
    assert failure is not None and "converting the weights failed" in str(failure) and "bad scale" in str(failure)
    assert not is_out_of_memory(failure)
    assert report.level == logging.NOTSET and not report.handlers  # left as it was
