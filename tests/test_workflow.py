"""The whole workflow, run by Snakemake in a temp dir on a tiny Llama, on CPU."""

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import FAKE_HUB_TOKEN, run_snakemake


def test_runs_table_has_one_row_per_run_with_finite_metrics(tiny_study):
    table = pd.read_csv(tiny_study / "results/tables/runs.csv")
    expected = ["base-nf4", "base-fp32", "r4-qv-nf4", "r8-qv-nf4", "r4-qkvo-mlp-nf4", "r4-qv-fp32", "r4-qv-nf4-s1"]
    assert list(table["run_id"]) == expected
    for column in ("perplexity", "eval_loss", "accuracy", "peak_memory_gb", "eval_tokens_per_s"):
        assert table[column].map(math.isfinite).all(), column
    trained = table[~table["is_baseline"]]
    for column in ("train_wall_s", "train_tokens_per_s", "adapter_size_mb", "final_train_loss"):
        assert (trained[column] > 0).all(), column
    assert (trained["memory_kind"] == "cpu_peak_rss").all()
    # The training phase's own peak (what the planner predicts) beside the whole job's, never above it.
    assert (trained["train_peak_memory_gb"] > 0).all()
    assert (trained["train_peak_memory_gb"] <= trained["peak_memory_gb"] + 1e-9).all()
    plan = pd.read_csv(tiny_study / "results/tables/derived/memory_plan.csv")
    assert (plan["measured_phase"] == "training").all()
    params = dict(zip(trained["run_id"], trained["trainable_params"], strict=True))
    assert params["r4-qv-nf4"] * 2 == params["r8-qv-nf4"]  # LoRA parameters grow linearly with rank
    assert params["r4-qv-nf4"] == params["r4-qv-fp32"] < params["r4-qkvo-mlp-nf4"]
    markdown = (tiny_study / "results/tables/runs.md").read_text()
    assert markdown.count("\n") == 2 + len(table)


def test_adapters_load_with_peft_and_hold_what_training_learned(tiny_study, tiny_llama):
    """PEFT starts every lora_B at zero: a trained adapter has none left at zero and changes the model's output."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.arange(5, 21).unsqueeze(0)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    for run in ("r4-qv-nf4", "r4-qkvo-mlp-nf4", "r4-qv-fp32"):
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_llama), tiny_study / f"results/runs/{run}/adapter"
        ).eval()
        lora_b = [param for name, param in model.named_parameters() if "lora_B" in name]
        assert lora_b and all(param.abs().max() > 0 for param in lora_b), run
        with torch.no_grad():
            assert not torch.allclose(model(input_ids=ids).logits, base_logits), run


def test_every_job_logged_progress(tiny_study):
    """Every job of the study (as a forced dry run lists them) wrote its log, from its first phase to its total;
    training logged its steps, evaluation its perplexity or the hand-off it took."""
    result = run_snakemake(tiny_study, "--cores", "1", "--dry-run", "--forceall")
    assert result.returncode == 0, result.stderr[-2000:]
    logs = re.findall(r"^\s*log: (\S+)$", result.stdout, flags=re.MULTILINE)
    # 5 runs x (check, train, evaluate, anatomy), 2 base models, and prepare x 2, plan, aggregate, findings.
    assert len(logs) == len(set(logs)) == 5 * 4 + 2 + 5
    for log in logs:
        text = (tiny_study / log).read_text()
        assert " phase start " in text and " phase total " in text, log
    for run in ("r4-qv-nf4", "r8-qv-nf4", "r4-qkvo-mlp-nf4", "r4-qv-fp32", "r4-qv-nf4-s1"):
        assert "step 3/3 loss" in (tiny_study / f"logs/train/{run}.log").read_text()
    for log in (tiny_study / "logs/evaluate").glob("*.log"):
        text = log.read_text()
        assert "perplexity" in text or "evaluated by the training job" in text, log


def test_every_job_logs_where_its_time_went_and_the_bench_sums_it(tiny_study):
    """Each job logs its phases (lora_study.core.phases); the phases add up to the job's logged total; the training
    and evaluation jobs mark their own compute; bench/stage_times.py turns the logs into the per-stage table."""
    import subprocess
    import sys

    from lora_study.core.phases import LINE

    logs = sorted((tiny_study / "logs").rglob("*.log"))
    assert logs
    for log in logs:
        found = [(m["name"], float(m["seconds"])) for m in map(LINE.search, log.read_text().splitlines()) if m]
        names = [name for name, _ in found]
        assert names[0] == "start" and names[-1] == "total", (log, names)
        assert abs(sum(s for name, s in found[:-1]) - found[-1][1]) < 0.01 * len(found)
        if log.parent.name == "train":
            assert {"imports", "checks", "load", "compute", "write"} <= set(names), (log, names)
        if log.parent.name == "evaluate" and log.stem.startswith("base-"):
            assert {"imports", "checks", "load", "compute", "write"} <= set(names), (log, names)
        elif log.parent.name == "evaluate":  # the training job evaluated: this job only took its result
            assert set(names) == {"start", "write", "total"}, (log, names)
    bench = Path(__file__).resolve().parent.parent / "bench" / "stage_times.py"
    table = subprocess.run([sys.executable, str(bench), "--logs", str(tiny_study / "logs")], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    assert "get_cpu_capability()" in table and "| train | 5 |" in table and "% of the wall" in table


def test_the_training_jobs_evaluation_is_exactly_the_evaluate_jobs(tiny_study, tmp_path):
    """Every trained run of the tiny study was scored by its training job and taken by its evaluate job
    (lora_study.measure.handoff); evaluating two of them again in evaluate jobs of their own gives the same bytes."""
    import json
    import shutil

    trained = ["r4-qv-nf4", "r8-qv-nf4", "r4-qkvo-mlp-nf4", "r4-qv-fp32", "r4-qv-nf4-s1"]
    for run in trained:
        assert "evaluated in the training job" in (tiny_study / f"logs/train/{run}.log").read_text()
        assert "evaluated by the training job" in (tiny_study / f"logs/evaluate/{run}.log").read_text()
        assert not (tiny_study / f"results/runs/{run}/evaluated_in_training").exists()  # taken: removed
    assert "evaluated by the training job" not in (tiny_study / "logs/evaluate/base-nf4.log").read_text()
    study = tmp_path / "study"
    shutil.copytree(tiny_study, study, symlinks=True)
    again = ["r4-qv-nf4", "r4-qv-fp32"]
    targets = [f"results/runs/{run}/eval_metrics.json" for run in again]
    result = run_snakemake(study, "--cores", "2", "--forcerun", "evaluate", *targets)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for run in again:
        assert "evaluated by the training job" not in (study / f"logs/evaluate/{run}.log").read_text()
        for name in ("predictions.jsonl", "examples.csv", "general.csv"):
            first, second = (root / f"results/runs/{run}/{name}" for root in (tiny_study, study))
            assert first.read_bytes() == second.read_bytes(), (run, name)
        first, second = (json.loads((root / f"results/runs/{run}/eval_metrics.json").read_text())
                         for root in (tiny_study, study))  # fmt: skip
        assert (first["evaluated_in"], second["evaluated_in"]) == ("training job", "evaluate job")
        for key in (
            "perplexity",
            "eval_loss",
            "accuracy",
            "accuracy_by_family",
            "eval_tokens",
            "loss_path",
            "general_perplexity",
            "general_tokens",
        ):
            assert first[key] == second[key], (run, key)


def test_jobs_forked_from_the_preloaded_interpreter_compute_what_fresh_ones_do(tiny_study, tmp_path):
    """The tiny study's jobs ran in children of the preloaded interpreter (lora_study.core.preload); training two
    runs again with execution.preload off, each job in its own interpreter, gives the same adapter and
    evaluation bytes."""
    import json
    import shutil

    forked = [log for log in (tiny_study / "logs").rglob("*.log") if "forked from the preloaded" in log.read_text()]
    assert {log.parent.name for log in forked} >= {"train", "evaluate", "anatomy", "check"}
    table = pd.read_csv(tiny_study / "results/tables/runs.csv")
    assert set(table[~table["is_baseline"]]["process"]) == set(table["eval_process"]) == {"preloaded"}
    study = tmp_path / "study"
    shutil.copytree(tiny_study, study, symlinks=True)
    config = yaml.safe_load((study / "config.yaml").read_text())
    config.setdefault("execution", {})["preload"] = False
    (study / "config.yaml").write_text(yaml.safe_dump(config))
    again = ["r4-qv-nf4", "r4-qv-fp32"]
    targets = [f"results/runs/{run}/eval_metrics.json" for run in again]
    result = run_snakemake(study, "--cores", "2", "--forcerun", "train", *targets)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "preloaded interpreter: off (execution.preload is false)" in result.stderr
    for run in again:
        assert "forked from the preloaded" not in (study / f"logs/train/{run}.log").read_text()
        kinds = [json.loads((root / f"results/runs/{run}/train_metrics.json").read_text())["environment"]["process"]
                 for root in (tiny_study, study)]  # fmt: skip
        assert kinds == ["preloaded", "fresh"]
        for name in ("adapter/adapter_model.safetensors", "predictions.jsonl", "examples.csv", "general.csv"):
            first, second = (root / f"results/runs/{run}/{name}" for root in (tiny_study, study))
            assert first.read_bytes() == second.read_bytes(), (run, name)


def test_report_is_built_by_the_same_run(tiny_study):
    results = tiny_study / "results"
    findings = (results / "report/findings.md").read_text()
    assert "## Headline findings" in findings and "Best run:" in findings
    assert "peak CPU memory (process RSS; no GPU was used)" in findings
    tables = {p.stem for p in (results / "tables/derived").glob("*.csv")}
    assert tables == {
        "rank", "modules", "quantization", "diminishing_returns", "time_memory",
        "pareto_memory", "pareto_time", "decision", "memory_plan", "base_quantization", "reference_claims",
        "anatomy", "comparisons", "forgetting", "field_claims",
    }  # fmt: skip
    charts = {p.stem for p in (results / "charts").glob("*.svg")}
    assert (
        len(charts) == 11 and {"effective_rank", "memory_breakdown", "comparisons", "learning_vs_forgetting"} <= charts
    )
    # The centre configuration's two seeds measure training noise; every one-seed verdict borrows it.
    assert "seed noise pooled from 2 replicates of r4-qv-nf4" in findings
    assert "Noise: training noise measured on replicates of r4-qv-nf4 (2 seeds)" in findings
    for stem in charts:
        for fmt in ("html", "svg", "png"):
            assert (results / f"charts/{stem}.{fmt}").stat().st_size > 1000, (stem, fmt)


def test_snakemake_report_shows_every_chart_with_its_caption(tiny_study, tmp_path):
    from lora_study.questions import QUESTIONS
    from lora_study.report.question import caption

    result = run_snakemake(tiny_study, "--report", str(tmp_path / "report.html"))
    assert result.returncode == 0, result.stderr[-3000:]
    page = (tmp_path / "report.html").read_text()
    charts = list((tiny_study / "results/charts").glob("*.svg"))
    assert len(charts) > 8
    for chart in charts:
        text = caption(QUESTIONS, chart.stem)
        assert f"<strong>{chart.stem.replace('_', ' ')}</strong>: {text}" in page, chart.stem


def test_report_reads_in_order_headline_contents_sections_methods(tiny_study):
    findings = (tiny_study / "results/report/findings.md").read_text()
    headings = [line for line in findings.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## Headline findings", "## Contents"]
    # The sections in registry order (lora_study.questions.QUESTIONS): the claims and every verdict last.
    assert headings[-4:] == [
        "## The reference study's claims, checked",
        "## The field's claims, checked",
        "## Every verdict against its reference",
        "## Methods and definitions",
    ]
    # Each chart sits in the section of the table it summarises, its caption under it.
    section = findings.split("## Where the memory goes", 1)[1].split("\n## ", 1)[0]
    assert "![memory_breakdown](../charts/memory_breakdown.svg)" in section
    assert "*Where each run's memory goes:" in section and "| run_id " in section
    rank = findings.split("## Rank: quality and memory", 1)[1].split("\n## ", 1)[0]
    assert "../charts/quality_vs_rank.svg" in rank and "../charts/memory_vs_rank.svg" in rank
    assert "## Diminishing returns per rank step" in findings
    # Every section is listed in the contents, with a working anchor.
    for anchor in re.findall(r"\]\(#([\w-]+)\)", findings):
        assert f'<a id="{anchor}"></a>' in findings, anchor


def test_every_row_says_how_it_was_computed_and_runs_gain_against_their_own_base(tiny_study):
    from lora_study.training.precision import detect_capability

    table = pd.read_csv(tiny_study / "results/tables/runs.csv").set_index("run_id")
    fast = detect_capability(torch.device("cpu")).fast_dtype  # what `auto` must have resolved to here
    assert table.loc["r4-qv-nf4", "training.compute_dtype"] == "auto"
    assert (table.loc["r4-qv-nf4", "compute_dtype"], table.loc["r4-qv-nf4", "weight_format"]) == (fast, "nf4")
    # compute_dtype does not apply to unquantized weights: not in the run's settings, fp32 in its recipe.
    assert pd.isna(table.loc["r4-qv-fp32", "training.compute_dtype"])
    assert table.loc["r4-qv-fp32", "compute_dtype"] == "fp32"
    assert table.loc["base-nf4", "compute_dtype"] == fast
    assert set(table["capability.summary"].dropna()) and table["capability.native_bf16"].notna().all()
    # 3 steps, the first 2 of the process are warm-up: one steady step measured, no checkpoint time in it.
    trained = table[~table["is_baseline"]]
    assert (trained["throughput_steps"] == 1).all() and (trained["train_tokens_per_s"] > 0).all()
    assert (trained["job_wall_s"] > trained["train_wall_s"]).all()
    findings = (tiny_study / "results/report/findings.md").read_text()
    assert "Cost of quantizing the base model (no adapter): perplexity" in findings
    assert "(the base model in nf4, no adapter)" in findings or "(the base model in fp32, no adapter)" in findings
    assert "Precision recipe per quantization" in findings and f"nf4: weights nf4, compute {fast}" in findings
    base = pd.read_csv(tiny_study / "results/tables/derived/base_quantization.csv").set_index("run_id")
    assert base.loc["base-fp32", "perplexity_change_pct"] == 0
    expected = 100 * (table.loc["base-nf4", "perplexity"] / table.loc["base-fp32", "perplexity"] - 1)
    assert base.loc["base-nf4", "perplexity_change_pct"] == pytest.approx(expected)


def test_second_run_has_nothing_to_do(tiny_study):
    result = run_snakemake(tiny_study, "--cores", "2", "--dry-run")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_invalid_config_fails_before_any_job(tiny_study, tmp_path):
    config = yaml.safe_load((tiny_study / "config.yaml").read_text())
    config["sweep"]["grids"][0]["rank"] = [0]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "--cores", "1")
    assert result.returncode != 0
    assert "config key 'sweep.grids[0].rank[0]': 0 is less than the minimum of 1" in result.stderr
    assert not (tmp_path / "results").exists()


def test_a_hub_token_never_reaches_results_or_logs(tiny_study):
    # tiny_study ran with HF_TOKEN set (conftest.snakemake_env).
    leaked = []
    for folder in ("results", "logs", "benchmarks"):
        for path in (tiny_study / folder).rglob("*"):
            if path.is_file() and FAKE_HUB_TOKEN.encode() in path.read_bytes():
                leaked.append(path)
    assert not leaked
    assert (tiny_study / "results/tables/runs.csv").exists()  # the scan did see the study


def test_every_run_is_scored_on_general_text_and_the_report_weighs_learning_against_forgetting(tiny_study):
    """evaluation.forgetting (on by default, the Python docs' prose): every run and base model scored on the same
    general-text rows; the report's table, sentence and chart set each run's learning against its forgetting,
    with paired verdicts against its own base model."""
    import pandas as pd

    runs = pd.read_csv(tiny_study / "results/tables/runs.csv")
    assert runs["general_perplexity"].notna().all() and (runs["general_tokens"] == 32 * 127).all()
    general = pd.read_csv(tiny_study / "results/tables/general_examples.csv")
    assert set(general["run_id"]) == set(runs["run_id"]) and general.groupby("run_id").size().eq(32).all()
    table = pd.read_csv(tiny_study / "results/tables/derived/forgetting.csv")
    trained = runs[~runs["is_baseline"].astype(bool)]
    assert set(table["run_id"]) <= set(trained["config_id"]) and len(table) > 0
    row = table.iloc[0]
    base = runs.set_index("run_id").loc[row["base_id"]]
    assert row["forgetting_pct"] == pytest.approx(100 * (row["general_perplexity"] / base["general_perplexity"] - 1))
    assert table["forgets"].isin(["better", "worse", "equivalent", "inconclusive"]).all()
    findings = (tiny_study / "results/report/findings.md").read_text()
    assert "- Learning vs forgetting (general-text perplexity against each run's base model" in findings
    assert (tiny_study / "results/charts/learning_vs_forgetting.svg").exists()
