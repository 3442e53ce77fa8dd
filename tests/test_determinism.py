"""Same seed and settings on CPU: the same perplexity; another seed: another one."""

from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from conftest import tiny_study_config
from lora_study.config import validate_config
from lora_study.data import prepare_data
from lora_study.evaluate import evaluate_run
from lora_study.model_source import describe_model
from lora_study.sweep import expand_study
from lora_study.train import TrainOutputs, train_run


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    config = validate_config(tiny_study_config(tiny_llama))
    workdir = tmp_path_factory.mktemp("determinism")
    prepare_data(config["dataset"], AutoTokenizer.from_pretrained(tiny_llama), workdir / "splits")
    manifest = describe_model(tiny_llama, str(tiny_llama), trust_remote_code=False)
    return config, manifest, workdir


def train_and_score(setup, run_id: str, seed: int, name: str) -> float:
    config, manifest, workdir = setup
    spec = expand_study(config)[run_id]
    run = replace(spec, training=spec.training.replace(seed=seed))
    out = workdir / name
    train_run(
        run, manifest, workdir / "splits", TrainOutputs(out / "adapter", out / "t.json", out / "curve.csv"),
        threads=1, checkpoint_dir=out / "checkpoint",
    )  # fmt: skip
    metrics = evaluate_run(
        run, config["evaluation"], config["training"], manifest, workdir / "splits",
        out / "adapter", out / "e.json", out / "p.jsonl", out / "examples.csv", threads=1,
    )  # fmt: skip
    return metrics.perplexity


@pytest.mark.parametrize("run_id", ["r4-qv-nf4", "r4-qv-fp32"])
def test_same_seed_same_perplexity(setup, run_id):
    first = train_and_score(setup, run_id, seed=0, name=f"{run_id}-a")
    second = train_and_score(setup, run_id, seed=0, name=f"{run_id}-b")
    other_seed = train_and_score(setup, run_id, seed=1, name=f"{run_id}-c")
    assert abs(first - second) <= 1e-6 * first
    assert abs(first - other_seed) > 1e-6 * first
