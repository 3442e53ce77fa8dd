"""Same seed and settings on CPU: the same perplexity; another seed: another one."""

from dataclasses import replace

import pytest

from conftest import prepared_inputs, tiny_study_config, train_and_evaluate
from lora_study.study.sweep import expand_study


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("determinism")
    return *prepared_inputs(tiny_llama, tiny_study_config(tiny_llama), workdir), workdir


def train_and_score(setup, run_id: str, seed: int, name: str) -> float:
    config, manifest, splits, workdir = setup
    spec = expand_study(config)[run_id]
    run = replace(spec, training=spec.training.replace(seed=seed))
    return train_and_evaluate(run, config, manifest, splits, workdir / name, threads=1).perplexity


@pytest.mark.parametrize("run_id", ["r4-qv-nf4", "r4-qv-fp32"])
def test_same_seed_same_perplexity(setup, run_id):
    first = train_and_score(setup, run_id, seed=0, name=f"{run_id}-a")
    second = train_and_score(setup, run_id, seed=0, name=f"{run_id}-b")
    other_seed = train_and_score(setup, run_id, seed=1, name=f"{run_id}-c")
    assert abs(first - second) <= 1e-6 * first
    assert abs(first - other_seed) > 1e-6 * first
