"""lm-evaluation-harness on the study's own prompts: the real harness, a real (briefly trained) model, no network."""

from __future__ import annotations

import shutil

import pytest
import torch

from lora_study.measure.downstream import (
    LOCAL_GROUP,
    LmEvalSettings,
    TaskError,
    check_tasks,
    evaluate_tasks,
    write_local_tasks,
)
from lora_study.measure.evaluate import greedy_answers, normalize_answer
from lora_study.training.precision import detect_capability, recipe_for


def test_lm_eval_answers_the_studys_prompts_as_the_study_does(answering_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, rows = answering_model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    scored = list(range(len(rows)))
    manifest = write_local_tasks(rows, scored, tokenizer, max_new_tokens=8, out_dir=tmp_path)
    assert manifest["group"] == LOCAL_GROUP and sum(manifest["documents"].values()) == len(rows)

    settings = LmEvalSettings((LOCAL_GROUP,), num_fewshot=0, limit=None, batch_size=4)
    scores, samples = evaluate_tasks(model, tokenizer, settings, tmp_path, chat_template=True,
                                     mixed_precision_dtype=None)  # fmt: skip
    recipe = recipe_for("fp32", "fp32", detect_capability(torch.device("cpu")))
    own = greedy_answers(model, rows, 4, 8, tokenizer, tokenizer.pad_token_id, torch.device("cpu"), recipe)

    by_row = samples.set_index("row")
    assert sorted(by_row.index) == scored
    own_normalized = [normalize_answer(text) for text in own]
    assert sum(1 for text in own_normalized if text) >= len(rows) // 2, own_normalized  # a non-trivial check
    same = [by_row.loc[i, "response"] == own_normalized[i] for i in scored]
    # Same prompt tokens, greedy decoding, the study's normalisation: the answers are the study's own.
    assert sum(same) >= 0.9 * len(rows), list(zip(by_row.loc[scored, "response"], own_normalized, strict=True))
    hits = [own_normalized[i] == normalize_answer(rows[i]["answer"]) for i in scored]
    group = next(s for s in scores if s["task"] == LOCAL_GROUP and s["primary"])
    assert group["metric"] == "exact_match" and group["documents"] == len(rows)
    assert group["value"] == pytest.approx(samples["score"].mean())
    assert abs(group["value"] - sum(hits) / len(hits)) <= 1 - sum(same) / len(same) + 1e-9
    assert group["stderr"] is not None


def test_local_tasks_unknown_to_the_data_are_refused(answering_model, tmp_path):
    from transformers import AutoTokenizer

    model_dir, rows = answering_model
    manifest = write_local_tasks(rows, [0, 1, 2], AutoTokenizer.from_pretrained(model_dir), 8, tmp_path)
    with pytest.raises(TaskError, match=r"lora_study_poetry.*available: lora_study_"):
        check_tasks(LmEvalSettings(("lora_study_poetry",), 0, None, 1), manifest, tmp_path)
    empty = write_local_tasks(rows, [], AutoTokenizer.from_pretrained(model_dir), 8, tmp_path / "none")
    with pytest.raises(TaskError, match="no exact-answer rows"):
        check_tasks(LmEvalSettings((LOCAL_GROUP,), 0, None, 1), empty, tmp_path / "none")


def test_an_unknown_standard_task_is_named(answering_model, tmp_path):
    from transformers import AutoTokenizer

    model_dir, rows = answering_model
    manifest = write_local_tasks(rows, [0], AutoTokenizer.from_pretrained(model_dir), 8, tmp_path)
    with pytest.raises(TaskError, match=r"knows no task \['arc_easiest'\]"):
        check_tasks(LmEvalSettings(("arc_easiest",), 0, None, 1), manifest, tmp_path)


def test_documents_of_nested_groups_belong_to_the_configured_task():
    from lora_study.measure.downstream import configured_tasks

    results = {"group_subtasks": {"mmlu_stem": ["mmlu_stem_physics"], "mmlu_stem_physics": ["mmlu_physics_a",
               "mmlu_physics_b"], "mmlu_algebra": []}}  # fmt: skip
    owners = configured_tasks(results, ("mmlu_stem", "mmlu_algebra", "arc_easy"))
    assert owners == {"mmlu_physics_a": "mmlu_stem", "mmlu_physics_b": "mmlu_stem", "mmlu_algebra": "mmlu_algebra",
                      "arc_easy": "arc_easy"}  # fmt: skip


def test_limit_is_a_count_or_a_fraction():
    block = {"tasks": ["arc_easy"], "num_fewshot": 5, "batch_size": 2}
    assert LmEvalSettings.from_config({**block, "limit": 50.0}).limit == 50
    assert isinstance(LmEvalSettings.from_config({**block, "limit": 50.0}).limit, int)
    assert LmEvalSettings.from_config({**block, "limit": 0.25}).limit == 0.25
    assert LmEvalSettings.from_config({**block, "limit": None}).limit is None


# --- the whole workflow with lm-eval, the merge check and serving on -----------------------------------------


@pytest.fixture(scope="module")
def deployed_study(tiny_llama, tmp_path_factory):
    import yaml

    from conftest import run_snakemake, tiny_study_config

    config = tiny_study_config(tiny_llama)
    # One QLoRA run and its base: every deployed form of a quantized adapter (unquantized ones: test_deploy.py).
    config["sweep"]["grids"] = [{"rank": [4], "modules": [["q", "v"]], "quantization": ["nf4"]}]
    config["sweep"]["noise_replicates"] = 1  # one run: deployment does not need the seed noise
    config["evaluation"].update(
        lm_eval={"tasks": [LOCAL_GROUP], "batch_size": 4},
        merge_check={"enabled": True},
        serving={"enabled": True, "prompt_tokens": 16, "new_tokens": 4, "batch_size": 2, "repeats": 2},
        save_merged=True,
    )
    workdir = tmp_path_factory.mktemp("deployed")
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return workdir, config


EVALUATED = ("base-nf4", "r4-qv-nf4")


def test_every_run_has_lm_eval_scores_beside_its_own(deployed_study):
    import pandas as pd

    workdir, _ = deployed_study
    runs = pd.read_csv(workdir / "results/tables/runs.csv").set_index("run_id")
    assert set(runs.index) == set(EVALUATED)
    assert runs[f"lm_eval.{LOCAL_GROUP}"].notna().all() and runs[f"lm_eval.{LOCAL_GROUP}_stderr"].notna().all()
    derived = workdir / "results/tables/derived"
    downstream = pd.read_csv(derived / "downstream.csv").set_index("run_id")
    assert downstream.loc["r4-qv-nf4", "base"] == "base-nf4"
    # The verdict is the one the per-document scores give: paired over documents, one judged run.
    from lora_study.stats.verdicts import Evidence, compare

    samples = pd.read_csv(workdir / "results/tables/downstream_samples.csv")
    primary = samples[samples["metric"] == downstream.loc["r4-qv-nf4", "metric"]]
    scores = {run: primary[primary["run_id"] == run].sort_values(["task", "doc_id"])["score"].to_numpy(float)[None]
              for run in EVALUATED}  # fmt: skip
    evidence = {run: Evidence(nll=0 * value, tokens=1 + 0 * value[0], correct=value, trained=run != "base-nf4")
                for run, value in scores.items()}  # fmt: skip
    tolerance = deployed_study[1].get("report", {}).get("min_relative_gain", 0.01)  # the schema's default
    expected = compare(evidence["r4-qv-nf4"], evidence["base-nf4"], "accuracy", tolerance, 1)
    assert downstream.loc["r4-qv-nf4", "vs_base"] == expected.verdict.value
    agreement = pd.read_csv(derived / "downstream_agreement.csv").set_index("run_id")
    assert set(agreement.index) == set(EVALUATED) and (agreement["documents"] == 8).all()
    assert (agreement["agreement"] >= 0.9).all()
    # lm-eval's score is the mean of its per-document scores, the study's own over the same rows.
    own = pd.read_csv(workdir / "results/tables/examples.csv").dropna(subset=["correct"])
    for run_id in EVALUATED:
        assert agreement.loc[run_id, "own_exact_match"] == own[own["run_id"] == run_id]["correct"].mean()


def test_merge_check_and_serving_cover_every_deployed_form(deployed_study):
    import pandas as pd

    workdir, _ = deployed_study
    derived = workdir / "results/tables/derived"
    merges = pd.read_csv(derived / "merge_check.csv").set_index("run_id")
    assert list(merges.index) == ["r4-qv-nf4"]
    # Each check as its saved evidence gives it, judged at m = 2 (the table's two checks) and the configured
    # tolerance.
    import json
    import math

    from lora_study.measure.forms import MERGE_OUTCOMES
    from lora_study.stats.verdicts import decide

    record = json.loads((workdir / "results/runs/r4-qv-nf4/deploy.json").read_text())
    tolerance = deployed_study[1]["evaluation"]["merge_check"].get("tolerance", 0.01)
    for form in ("merged_16bit", "merged_requantized"):
        check = record["merge"][form]
        df = math.inf if check["df"] is None else check["df"]
        *_, verdict = decide(math.log1p(check["change"]), check["se"], df, "perplexity", tolerance, 2)
        assert merges.loc["r4-qv-nf4", f"{form}_check"] == MERGE_OUTCOMES[verdict]
    serving = pd.read_csv(derived / "serving.csv")
    forms = set(zip(serving["run_id"], serving["form"], strict=True))
    assert forms == {("base-nf4", "base"), ("r4-qv-nf4", "unmerged"), ("r4-qv-nf4", "merged_requantized")}
    assert (serving["ms_per_token_b1"] > 0).all() and (serving["tokens_per_s_b2"] > 0).all()
    assert serving["unmerged_overhead_pct"].notna().sum() == 1
    assert (serving["spread_pct_b1"] >= 0).all()
    findings = (workdir / "results/report/findings.md").read_text()
    for sentence in (
        "Downstream (lm-eval, 0-shot)",
        "Merge check (tolerance 1%",
        "Serving (greedy, 16-token prompt",
        "not judged by intervals: repeated generations spread by up to",
    ):
        assert sentence in findings
    for chart in ("downstream", "serving"):
        assert (workdir / f"results/charts/{chart}.svg").stat().st_size > 0


def test_the_merged_model_is_saved_for_serving(deployed_study):
    from transformers import AutoModelForCausalLM

    workdir, _ = deployed_study
    merged = workdir / "results/runs/r4-qv-nf4/merged"
    assert (merged / "model.safetensors").exists() and (merged / "tokenizer.json").exists()
    assert AutoModelForCausalLM.from_pretrained(merged).config.model_type == "llama"
    assert (workdir / "results/runs/base-nf4/merged/NOT_MERGED.txt").exists()


def test_serving_and_lm_eval_settings_rerun_only_their_jobs(deployed_study):
    import yaml
    from test_reruns import REPORT_JOBS, per_run, planned_jobs

    workdir, config = deployed_study
    try:
        edited = {**config, "evaluation": {**config["evaluation"], "serving": {**config["evaluation"]["serving"],
                                                                               "new_tokens": 6}}}  # fmt: skip
        (workdir / "config.yaml").write_text(yaml.safe_dump(edited))
        assert planned_jobs(workdir) == per_run(("deploy",), EVALUATED) | REPORT_JOBS
        edited = {**config, "evaluation": {**config["evaluation"], "lm_eval": {**config["evaluation"]["lm_eval"],
                                                                               "limit": 4}}}  # fmt: skip
        (workdir / "config.yaml").write_text(yaml.safe_dump(edited))
        assert planned_jobs(workdir) == per_run(("downstream",), EVALUATED) | REPORT_JOBS
    finally:
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def test_out_of_memory_after_training_is_data_in_every_stage(deployed_study, tmp_path):
    """evaluation.memory_limit_gb caps every job after training (a real address-space cap on CPU): evaluation,
    each deployed form and lm-eval record what did not fit, and the report still builds. The anatomy of a plain
    LoRA run reads only the adapter file and fits (test_methods covers its out-of-memory record on the model)."""
    import json

    import pandas as pd
    import yaml
    from test_reruns import REPORT_JOBS, per_run, planned_jobs

    from conftest import run_snakemake

    source, config = deployed_study
    workdir = tmp_path / "capped"
    shutil.copytree(source, workdir, symlinks=True)  # keeps mtimes: only what the cap changes reruns
    capped = {**config, "evaluation": {**config["evaluation"], "memory_limit_gb": 0.001}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(capped))
    trained = ("r4-qv-nf4",)
    assert planned_jobs(workdir) == (
        per_run(("evaluate", "deploy", "downstream"), EVALUATED) | per_run(("anatomy",), trained) | REPORT_JOBS
    )
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    def record(run_id: str, name: str) -> dict:
        return json.loads((workdir / f"results/runs/{run_id}/{name}").read_text())

    for run_id in EVALUATED:
        evaluation = record(run_id, "eval_metrics.json")
        assert evaluation["status"] == "oom" and evaluation["failure"]["memory_limit_gb"] == 0.001
        assert record(run_id, "downstream.json")["status"] == "oom"
        assert "load" in record(run_id, "downstream.json")["oom"]
        assert record(run_id, "deploy.json")["oom"]  # the form it was deployed as did not fit
    anatomy = pd.read_csv(workdir / "results/runs/r4-qv-nf4/anatomy.csv")
    assert len(anatomy) == 4 and anatomy["oom"].isna().all() and anatomy["layer"].notna().all()

    runs = pd.read_csv(workdir / "results/tables/runs.csv").set_index("run_id")
    assert (runs.loc[list(EVALUATED), "status"] == "oom").all()
    findings = (workdir / "results/report/findings.md").read_text()
    assert "Did not fit in memory" in findings
    for part in ("lm-eval of r4-qv-nf4", "deploy of r4-qv-nf4", "lm-eval of base-nf4"):
        assert part in findings
    assert "anatomy of r4-qv-nf4" not in findings
