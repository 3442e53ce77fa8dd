"""The bad-input corpus (tests/bad_inputs/cases.yaml), each case a real workflow run.

Every case must stop with its one clear message before any training starts,
leave no run outputs and no temporary files behind, and never execute config
text.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_family, run_snakemake, tiny_study_config

CORPUS = Path(__file__).parent / "bad_inputs" / "cases.yaml"
CASES = yaml.safe_load(CORPUS.read_text())


@pytest.fixture(scope="session")
def family_models(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Local model directories of other kinds: fused attention, unplaceable names, a layer whose weight the
    forward reads directly (Jamba), pre-quantized weights."""
    return {
        "phi3": build_tiny_family(tmp_path_factory.mktemp("tiny-phi3"), "phi3", tiny_llama),
        "mamba": build_tiny_family(tmp_path_factory.mktemp("tiny-mamba"), "mamba", tiny_llama),
        "jamba": build_tiny_family(tmp_path_factory.mktemp("tiny-jamba"), "jamba", tiny_llama),
        "prequantized": build_tiny_family(
            tmp_path_factory.mktemp("tiny-gptq"), "phi3", tiny_llama,
            quantization_config={"quant_method": "gptq", "bits": 4},
        ),
    }  # fmt: skip


@pytest.fixture(scope="session")
def pickled_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with its weights saved as a pickle (pytorch_model.bin) only."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("pickled-llama")
    shutil.copytree(tiny_llama, out, dirs_exist_ok=True)
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")  # the pre-safetensors format
    (out / "model.safetensors").unlink()
    assert (out / "pytorch_model.bin").exists() and not list(out.glob("*.safetensors"))
    return out


def merged(base: dict, override: dict) -> dict:
    result = dict(base)
    for key, value in override.items():
        result[key] = merged(base[key], value) if isinstance(value, dict) and key in base else value
    return result


def substituted(value, directory: Path):
    if isinstance(value, dict):
        return {k: substituted(v, directory) for k, v in value.items()}
    if isinstance(value, list):
        return [substituted(v, directory) for v in value]
    return value.replace("{dir}", str(directory)) if isinstance(value, str) else value


def write_case(case: dict, workdir: Path, model_dir: Path) -> None:
    base = tiny_study_config(model_dir)
    base["sweep"] = {"baseline": False, "grids": [{"rank": [4], "modules": [["q", "v"]], "quantization": ["nf4"]}]}
    config = merged(base, substituted(case.get("config", {}), workdir))
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    for name, content in case.get("files", {}).items():
        data = bytes.fromhex(content["hex"]) if isinstance(content, dict) else content.encode()
        (workdir / name).write_bytes(data)


@pytest.mark.parametrize("case", CASES, ids=[c["name"].replace(" ", "-") for c in CASES])
def test_bad_input_stops_early_with_one_clear_message(
    case, tiny_llama, tiny_gemma2, family_models, pickled_llama, tmp_path
):
    models = {None: tiny_llama, "pickle": pickled_llama, "gemma2": tiny_gemma2, **family_models}
    write_case(case, tmp_path, models[case.get("model")])
    extra_env = {}
    if "hide" in case:  # a platform without this package: every Python process sees it missing
        hidden = tmp_path / "hidden-packages"
        hidden.mkdir()
        (hidden / "sitecustomize.py").write_text(f"import sys\nsys.modules[{case['hide']!r}] = None\n")
        extra_env["PYTHONPATH"] = str(hidden)
    result = run_snakemake(tmp_path, "--cores", "2", extra_env=extra_env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(case["expect"], output), output[-4000:]
    assert "Traceback" not in output  # bad input is one message, not a stack trace
    if case.get("at_start"):  # refused while the workflow was parsed: no job ran at all
        assert not (tmp_path / "results").exists()
    trained = list((tmp_path / "results").glob("runs/*/train_metrics.json"))
    assert not trained  # stopped before any run trained
    results = tmp_path / "results"
    # Hidden names are what atomic writes use for temporaries (Snakemake's own marker aside).
    leftovers = [p for p in results.rglob(".*") if p.name != ".snakemake_timestamp"] if results.exists() else []
    assert not leftovers  # no temporary files or directories left behind
    assert not (tmp_path / "pwned").exists()


def test_the_corpus_covers_every_input_kind():
    names = {case["name"] for case in CASES}
    assert len(names) == len(CASES) >= 20
