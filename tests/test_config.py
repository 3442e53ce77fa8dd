import re
import shutil

import pytest
import yaml

from conftest import REPO, run_snakemake
from lora_study.study.config import ConfigError, canonical_json, validate_config
from lora_study.study.sweep import all_evaluated, expand_study

SHIPPED = sorted(path.name for path in (REPO / "config").glob("*.yaml") if path.name != "schema.yaml")


def minimal() -> dict:
    return {"model": {"source": "m"}, "dataset": {"source": "generated"}, "sweep": {"grids": [{}]}}


def test_defaults_are_filled_in():
    config = validate_config(minimal())
    assert config["training"]["max_steps"] == 24
    assert config["dataset"]["template"] == "chat"
    assert config["sweep"]["grids"][0]["quantization"] == ["nf4"]
    assert config["model"]["trust_remote_code"] is False


def test_every_config_file_is_checked():
    assert SHIPPED == [
        "config.yaml",
        "downstream.yaml",
        "methods.yaml",
        "phi2-alpaca.yaml",
        "questions.yaml",
        "seeds.yaml",
    ]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_is_valid_and_plans_one_training_per_run(name, tmp_path):
    """Valid, expanded into runs, and planned by Snakemake: one train job per run it expands to and one evaluate
    job per run and base model."""
    config = validate_config(yaml.safe_load((REPO / "config" / name).read_text()))
    runs, evaluated = expand_study(config), all_evaluated(config)
    assert runs and set(runs) < set(evaluated)
    shutil.copy(REPO / "config" / name, tmp_path / "config.yaml")
    result = run_snakemake(tmp_path, "--cores", "1", "--dry-run")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    planned: dict[str, set[str]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", result.stdout):
        if (rule := re.match(r"(?:local)?rule (\w+):", block)) and (
            run := re.search(r"wildcards: run=([\w.+-]+)", block)
        ):
            planned.setdefault(rule[1], set()).add(run[1])
    assert planned["train"] == set(runs)
    assert planned["evaluate"] == set(evaluated)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("training", "learnig_rate", 0.1, r"config key 'training': .*'learnig_rate' was unexpected"),
        (
            "training",
            "learning_rate",
            "fast",
            r"config key 'training.learning_rate': 'fast' is not of type 'number'",
        ),
        ("training", "batch_size", 0, r"config key 'training.batch_size': 0 is less than the minimum"),
        ("dataset", "template", "vicuna", r"config key 'dataset.template': 'vicuna' is not one of"),
    ],
)
def test_bad_values_name_the_key(section, key, value, message):
    config = minimal()
    config.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"rank": [0]}, r"sweep.grids\[0\].rank\[0\]': 0 is less than the minimum"),
        ({"quantization": ["nf3"]}, r"sweep.grids\[0\].quantization\[0\]': 'nf3' is not one of"),
        ({"alpha": ["twice"]}, r"sweep.grids\[0\].alpha\[0\]'"),
        ({"alpha": [-1]}, r"sweep.grids\[0\].alpha\[0\]'"),
        ({"modules": [[]]}, r"sweep.grids\[0\].modules\[0\]'"),
    ],
)
def test_bad_sweep_axes_are_rejected(grid, message):
    config = minimal()
    config["sweep"]["grids"] = [grid]
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_missing_section_and_empty_config():
    with pytest.raises(ConfigError, match="'model' is a required property"):
        validate_config({"dataset": {"source": "generated"}, "sweep": {}})
    with pytest.raises(ConfigError, match="config is empty"):
        validate_config({})


def test_canonical_json_ignores_key_order_and_number_spelling():
    a = yaml.safe_load("lr: 1.0e-3\nsteps: 10\nnested: {b: 1, a: 2}")
    b = yaml.safe_load("nested: {a: 2, b: 1}\nsteps: 10\nlr: 0.001")
    assert canonical_json(a) == canonical_json(b)
