"""Data as an axis: training.train_examples swept with rank in a whole workflow on the tiny model."""

from __future__ import annotations

import json

import pandas as pd
import yaml

from conftest import run_snakemake, tiny_study_config

SIZES = (8, 16)


def test_train_examples_crossed_with_rank_trains_on_subsets_and_answers_how_much_rank_the_data_needs(
    tiny_llama, tmp_path
):
    config = tiny_study_config(tiny_llama)
    config["training"].update(max_steps=None, epochs=1, batch_size=4)
    config["sweep"] = {"baseline": False, "grids": [
        {"rank": [4, 8], "modules": [["q", "v"]], "quantization": ["fp32"], "training": {"train_examples": list(SIZES)}}
    ]}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    for rank in (4, 8):
        for size in SIZES:
            run = f"r{rank}-qv-fp32-ex{size}"  # the data size is in the id, like any training axis
            trained = json.loads((tmp_path / f"results/runs/{run}/train_metrics.json").read_text())
            assert trained["steps"] == size // 4  # one epoch over the first `size` rows
    table = pd.read_csv(tmp_path / "results/tables/derived/rank_for_data.csv")
    assert list(table["train_examples"]) == list(SIZES) and set(table["rank_needed"]) <= {4, 8}
    findings = (tmp_path / "results/report/findings.md").read_text()
    assert "- Rank needed per training-set size (the smallest rank equivalent to the best at that size" in findings
    assert "matrix__rank__train_examples" in {p.stem for p in (tmp_path / "results/tables/derived").glob("*.csv")}
    # More rows than were prepared: the run stops with the fix, before loading the model.
    config["sweep"]["grids"][0]["training"]["train_examples"] = [100000]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "--cores", "2", "results/runs/r4-qv-fp32-ex100000/train_metrics.json")
    assert result.returncode != 0
    log = (tmp_path / "logs/train/r4-qv-fp32-ex100000.log").read_text()
    assert "training.train_examples 100000, but the prepared training split has 216 rows" in log
