"""One run on two devices as one job (training.gpus: 2): FSDP2 over two CPU processes (gloo) here, the same code as
on two GPUs. The sharded study must train what the one-device study trains."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import run_snakemake, tiny_study_config
from lora_study.questions.memory_plan import GATHERED_TERM, memory_terms
from lora_study.study.config import ConfigError, validate_config
from lora_study.study.sweep import expand_study

RUNS = ("r4-qv-nf4", "r4-qv-fp32")  # QLoRA on 4-bit weights, and LoRA on unquantized ones
# Same global batch, data order and seed, no dropout (each rank draws its own masks): the two layouts differ by the
# order of float sums (the ranks' gradients reduced, the loss summed per rank) and by the loss path (sharded runs
# compute full logits).
LOSS_TOLERANCE = 1e-4  # relative, per step
PERPLEXITY_TOLERANCE = 1e-3
# The planner's per-rank CPU prediction against the measured rank peak (bench/planner_cpu.py measures it per run).
PLAN_TOLERANCE = 0.25


def study_config(tiny_llama: Path, gpus: int) -> dict:
    config = tiny_study_config(tiny_llama)
    config["training"].update(gpus=gpus, max_steps=4, lora_dropout=0.0)
    config["sweep"] = {
        "baseline": False,
        "grids": [{"rank": [4], "modules": [["q", "v"]], "quantization": ["nf4", "fp32"]}],
    }
    return config


@pytest.fixture(scope="module")
def studies(tiny_llama, tmp_path_factory) -> dict[int, Path]:
    """The same two runs trained and evaluated on one device and on two."""
    done = {}
    for gpus in (1, 2):
        workdir = tmp_path_factory.mktemp(f"gpus{gpus}")
        (workdir / "config.yaml").write_text(yaml.safe_dump(study_config(tiny_llama, gpus)))
        targets = [f"results/runs/{run}/eval_metrics.json" for run in RUNS]
        result = run_snakemake(workdir, "--cores", "2", *targets)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
        done[gpus] = workdir
    return done


def metrics(workdir: Path, run: str, kind: str) -> dict:
    return json.loads((workdir / f"results/runs/{run}/{kind}_metrics.json").read_text())


@pytest.mark.parametrize("run", RUNS)
def test_a_sharded_run_trains_what_one_device_trains(studies, run):
    one, two = (pd.read_csv(studies[g] / f"results/runs/{run}/loss_curve.csv") for g in (1, 2))
    assert list(one["step"]) == list(two["step"]) == [1, 2, 3, 4]
    assert (abs(two["loss"] - one["loss"]) / one["loss"]).max() < LOSS_TOLERANCE
    assert (two["tokens_seen"] == one["tokens_seen"]).all()  # every rank's tokens counted once
    ppl_one, ppl_two = (metrics(studies[g], run, "eval")["perplexity"] for g in (1, 2))
    assert abs(ppl_two - ppl_one) / ppl_one < PERPLEXITY_TOLERANCE
    trained = metrics(studies[2], run, "train")
    assert trained["gpus"] == 2 and metrics(studies[1], run, "train")["gpus"] == 1
    peaks = trained["memory"]["rank_peak_memory_gb"]
    assert len(peaks) == 2 and trained["memory"]["peak_memory_gb"] == max(peaks) > 0
    # The planner predicted one rank's peak (CPU: each rank a process of its own), measured on each rank.
    plan = trained["memory_plan"]
    assert plan["gpus"] == 2 and plan["gathered_gb"] > 0
    assert abs(plan["predicted_cpu_gb"] - max(peaks)) / max(peaks) < PLAN_TOLERANCE
    # The report's memory breakdown, per GPU: the rank's shard of the weights and the layers gathered whole.
    terms = memory_terms(plan, "cpu")
    assert terms[GATHERED_TERM] == pytest.approx(plan["gathered_gb"]) and terms["base weights"] >= 0
    assert sum(terms.values()) == pytest.approx(plan["predicted_cpu_gb"])
    # Sharding changes no count: every trainable parameter once.
    assert trained["trainable_params"] == metrics(studies[1], run, "train")["trainable_params"]


def test_the_saved_adapter_is_whole_and_loads_in_a_plain_peft_client(studies, tiny_llama):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = studies[2] / "results/runs/r4-qv-fp32/adapter"
    saved, single = (load_file(studies[g] / "results/runs/r4-qv-fp32/adapter/adapter_model.safetensors")
                     for g in (2, 1))  # fmt: skip
    assert saved.keys() == single.keys() and all(saved[k].shape == single[k].shape for k in saved)
    assert all(torch.allclose(saved[k], single[k], rtol=1e-3, atol=1e-5) for k in saved)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_the_layout_is_not_in_the_run_id_and_reaches_the_job_and_the_table(studies):
    for workdir in studies.values():
        assert sorted(p.name for p in (workdir / "results/runs").iterdir()) == sorted(RUNS)
    log = (studies[2] / "logs/train/r4-qv-nf4.log").read_text()
    assert "sharded over 2 processes (FSDP2)" in log and "rank 0 of 2" in log
    assert re.search(r" phase compute \d+\.\d+ s$", log, flags=re.M)  # rank 0's phases, in the job's log
    config = validate_config(study_config(Path("/nonexistent"), 2))
    params = expand_study(config)["r4-qv-nf4"].as_params()
    assert params["training"]["gpus"] == 2
    assert "gpus" not in expand_study(validate_config(study_config(Path("/x"), 1)))["r4-qv-nf4"].as_params()["training"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sweep": {"grids": [{"method": ["pissa"], "quantization": ["fp32"]}]}}, "method pissa trains on one device"),
        ({"training": {"batch_size": 1}}, "a batch of 1 rows cannot give each of 2 devices a row"),
        ({"training": {"optimizer": "paged_adamw_8bit"}}, "8-bit optimizers cannot update sharded parameters"),
    ],
)
def test_what_cannot_be_sharded_is_refused_before_any_job(change, message, tmp_path):
    config = study_config(tmp_path, 2)
    for section, values in change.items():
        config[section].update(values)
    with pytest.raises(ConfigError, match=message):
        expand_study(validate_config(config))


def test_an_interrupted_sharded_run_resumes_to_the_adapter_it_would_have_trained(tiny_llama, tmp_path_factory):
    """A time limit's SIGTERM reaches the job, which passes it to the ranks: they finish the step, checkpoint
    their shards together and exit; the next run resumes from it and ends with the uninterrupted run's adapter."""
    import signal

    from safetensors.torch import load_file
    from test_faults import _interrupt, small_config, write_config

    runs = [{"id": "long", "rank": 4, "modules": ["q", "v"], "quantization": "fp32"}]
    config = small_config(tiny_llama, runs, max_steps=120, log_every=20, lora_dropout=0.0, gpus=2)
    config["execution"] = {"checkpoint_every": 20}
    adapters = {}
    for name in ("uninterrupted", "interrupted"):
        workdir = tmp_path_factory.mktemp(name)
        write_config(workdir, config)
        if name == "interrupted":
            stopped_at = _interrupt(workdir, beyond=20, kill_signal=signal.SIGTERM)
            log = (workdir / "logs/train/long.log").read_text()
            assert 40 <= stopped_at < 120 and f"SIGTERM received: stopped after step {stopped_at}" in log
            assert len(list((workdir / "results/checkpoints/long/shards").glob("*.distcp"))) == 2  # one per rank
        result = run_snakemake(workdir, "--cores", "2", "results/runs/long/train_metrics.json")
        assert result.returncode == 0, result.stderr[-3000:]
        if name == "interrupted":
            assert f"resuming from the checkpoint at step {stopped_at}" in (workdir / "logs/train/long.log").read_text()
            assert metrics(workdir, "long", "train")["resumed_from_step"] == stopped_at
            assert not (workdir / "results/checkpoints/long").exists()
        adapters[name] = load_file(workdir / "results/runs/long/adapter/adapter_model.safetensors")
    assert adapters["interrupted"].keys() == adapters["uninterrupted"].keys()
    for key, tensor in adapters["uninterrupted"].items():
        assert torch.allclose(adapters["interrupted"][key], tensor, rtol=1e-5, atol=1e-7), key


def test_data_whose_epochs_end_in_a_batch_too_small_to_share_is_refused_at_the_start(tiny_llama, tmp_path):
    """213 training rows in batches of 4 leave a last batch of one row each epoch: one of two ranks would get
    nothing. The job stops before loading the model, with one line that names the fix."""
    config = study_config(tiny_llama, 2)
    config["dataset"]["max_train_examples"] = 213
    config["sweep"]["grids"][0]["quantization"] = ["fp32"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "--cores", "2", "results/runs/r4-qv-fp32/train_metrics.json")
    assert result.returncode != 0
    log = (tmp_path / "logs/train/r4-qv-fp32.log").read_text()
    assert "each epoch ends with a batch of 1 row(s) (213 training rows, batch_size 4), too few for 2 devices" in log
    lines = log.splitlines()
    said = [i for i, line in enumerate(lines) if "ERROR run 'r4-qv-fp32': each epoch ends" in line]  # rank 0's line
    assert len(said) == 1 and not lines[said[0] + 1].startswith("Traceback")  # one line, no traceback after it
    assert "trainable params" not in log  # stopped before the model was loaded


def test_auto_trains_on_the_fewest_devices_whose_prediction_fits_the_budget(tiny_llama, tmp_path):
    """`gpus: auto`: plan.csv predicts the run on 1, 2, 4 and 8 devices; with a budget between its 1- and
    2-device predictions the job gets two (resource, claim, ranks) and records them; the run id stays; a budget
    edit that changes the count retrains it, one that does not changes nothing."""
    run = "r4-qv-fp32"
    config = study_config(tiny_llama, 1)
    config["training"]["gpus"] = "auto"
    config["sweep"]["grids"][0]["quantization"] = ["fp32"]
    config["plan"] = {"device": "cpu", "memory_budget_gb": None}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "--cores", "2", "results/tables/plan.csv")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    row = pd.read_csv(tmp_path / "results/tables/plan.csv").set_index("run_id").loc[run]
    one, two = row["predicted_cpu_gb_1gpu"], row["predicted_cpu_gb_2gpu"]
    assert row["gpus"] == 1 and two < one  # no budget: one device; two hold less each (activations, states)
    config["plan"]["memory_budget_gb"] = float((one + two) / 2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "--cores", "2", f"results/runs/{run}/eval_metrics.json")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert (tmp_path / f"results/runs/{run}/train_metrics.json").exists(), result.stdout[-3000:] + result.stderr[-5000:]
    trained = metrics(tmp_path, run, "train")
    assert trained["status"] == "ok" and trained["gpus"] == 2 and len(trained["memory"]["rank_peak_memory_gb"]) == 2
    assert "sharded over 2 processes (FSDP2)" in (tmp_path / f"logs/train/{run}.log").read_text()
    assert run_snakemake(tmp_path, "--cores", "2", "results/tables/plan.csv").returncode == 0
    assert pd.read_csv(tmp_path / "results/tables/plan.csv").set_index("run_id").loc[run, "gpus"] == 2  # the same
    target = f"results/runs/{run}/train_metrics.json"
    assert "Nothing to be done" in run_snakemake(tmp_path, "-n", "--cores", "2", target).stdout
    config["plan"]["memory_budget_gb"] = float(two + (one - two) / 4)  # still two devices: nothing to retrain
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = run_snakemake(tmp_path, "-n", "--cores", "2", target)
    assert "rule train:" not in dry.stdout, dry.stdout[-3000:]
    config["plan"]["memory_budget_gb"] = float(one * 2)  # now one fits: the run trains again, on one
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = run_snakemake(tmp_path, "-n", "--cores", "2", target)
    assert "rule train:" in dry.stdout, dry.stdout[-3000:]


def test_out_of_memory_on_a_rank_is_recorded_once_as_the_runs_result(tiny_llama, tmp_path):
    """memory_limit_gb caps each device of a sharded run; a rank that runs out of memory stops the run, which is
    recorded as status "oom" (with the rank) like a one-device run's, and the study goes on to report it."""
    run = "r4-qv-fp32"
    config = study_config(tiny_llama, 2)
    config["sweep"]["grids"][0]["quantization"] = ["fp32"]
    config["training"]["memory_limit_gb"] = 0.001
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "--cores", "2", f"results/runs/{run}/eval_metrics.json")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    trained = metrics(tmp_path, run, "train")
    assert trained["status"] == "oom" and trained["gpus"] == 2
    failure = trained["failure"]
    assert failure["memory_limit_gb"] == 0.001 and failure["rank"] in (0, 1)
    assert failure["rank"] == min(failure["ranks_out_of_memory"])
    assert metrics(tmp_path, run, "eval")["status"] == "oom"
    log = (tmp_path / f"logs/train/{run}.log").read_text()
    assert log.count("the run is recorded as status 'oom'") == 1 and "Traceback" not in log
    assert "another rank ran out of memory" not in log or failure["ranks_out_of_memory"] != [0, 1]
