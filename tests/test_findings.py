"""Derived tables and finding sentences on small hand-built run tables."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from lora_study.analysis.runs import STATUS_LABELS, memory_label, prepare
from lora_study.questions import QUESTIONS
from lora_study.questions.pareto import pareto_front
from lora_study.report.page import ask
from lora_study.report.question import FindingSettings
from lora_study.stats.verdicts import Evidence, Judge

SETTINGS = FindingSettings(sweet_spot_tolerance=0.02, min_relative_gain=0.01, memory_budgets_gb=(2, 5, 8))


def all_tables(table: pd.DataFrame, settings: FindingSettings, judge: Judge | None = None) -> dict[str, pd.DataFrame]:
    """Every table the registered questions derive from `table` (the claims and the verdict list left out)."""
    _, answers = ask(QUESTIONS, table, settings, judge)
    return {name: frame for a in answers if not a.question.answered_last for name, frame in a.tables.items()}


def headline_findings(table: pd.DataFrame, settings: FindingSettings, judge: Judge | None = None) -> list[str]:
    """The report's headline: every registered question's sentences, in registry order."""
    _, answers = ask(QUESTIONS, table, settings, judge)
    return [sentence for a in answers for sentence in a.findings]


def run(run_id, rank=16, modules="q,k,v,o", quant="nf4", ppl=5.0, mem=4.0, time=10.0, params=None, **extra):
    columns = {k: extra.pop(k) for k in list(extra) if "dtype" in k}
    return columns | {
        "run_id": run_id,
        "is_baseline": run_id.startswith("base-"),
        "rank": rank,
        "alpha": 2.0 * rank,
        "modules": modules,
        "quantization": quant,
        "double_quant": quant == "nf4",
        "training.learning_rate": 0.001,
        "perplexity": ppl,
        "accuracy": extra.pop("acc", 0.5),
        "peak_memory_gb": mem,
        "memory_kind": "cpu_peak_rss",
        "train_wall_s": time,
        "train_tokens_per_s": 100.0,
        "trainable_params": params if params is not None else rank * 1000,
        "status": extra.pop("status", "ok"),
        "device_name": "cpu",
    }


def base(quant: str, ppl: float) -> dict:
    return run(f"base-{quant}", rank=0, modules="", quant=quant, ppl=ppl, mem=1.0, time=float("nan"), params=0)


def study(*runs) -> pd.DataFrame:
    """The runs with the base model in NF4 (perplexity 20) and in fp32 (19)."""
    return pd.DataFrame([base("nf4", 20.0), base("fp32", 19.0), *runs])


def judge_for(table: pd.DataFrame, noise: float = 0.0, rows: int = 400, noisy: tuple[str, ...] = ()) -> Judge:
    """Constructed per-row scores whose perplexity is each run's: one shared row pattern (paired rows),
    plus independent per-row noise (nats) for the runs in `noisy` (all runs when empty)."""
    rng = np.random.default_rng(0)
    pattern = rng.gamma(4.0, 1.0, rows)
    tokens = np.full(rows, 10.0)
    evidence = {}
    for run_id, ppl in zip(table["run_id"], table["perplexity"], strict=True):
        if not math.isfinite(ppl):
            continue
        nll = tokens * math.log(ppl) * pattern / pattern.mean()
        if noise and (not noisy or run_id in noisy):
            shift = rng.normal(0, noise, rows)
            nll = nll + shift - shift.mean()  # noisy rows, same total: the perplexity stays exact
        evidence[run_id] = Evidence(nll=nll[None], tokens=tokens)
    return Judge(evidence)


def findings(*runs, **judge_options) -> list[str]:
    table = study(*runs)
    return headline_findings(table, SETTINGS, judge_for(table, **judge_options))


def tables_of(*runs, table: pd.DataFrame | None = None, **judge_options) -> dict[str, pd.DataFrame]:
    table = study(*runs) if table is None else table
    return all_tables(table, SETTINGS, judge_for(table, **judge_options))


RANK_SWEEP = [
    run("r4", rank=4, ppl=8.0, mem=2.0, time=10),
    run("r8", rank=8, ppl=6.0, mem=3.0, time=12),
    run("r16", rank=16, ppl=5.0, mem=4.0, time=15),
    run("r32", rank=32, ppl=4.98, mem=6.0, time=20),
    run("r64", rank=64, ppl=4.96, mem=9.0, time=30),
]


def test_rank_table_and_quality_per_gb():
    tables = tables_of(*RANK_SWEEP)
    ranks = tables["rank"]
    assert list(ranks["rank"]) == [4, 8, 16, 32, 64]
    # (20 - 8) / 2 GB
    assert ranks["quality_per_gb"].iloc[0] == pytest.approx(6.0)


def test_diminishing_returns_steps_and_the_knee():
    steps = tables_of(*RANK_SWEEP)["diminishing_returns"]
    assert list(steps["step"]) == ["4 -> 8", "8 -> 16", "16 -> 32", "32 -> 64"]
    assert steps["perplexity_change"].iloc[0] == pytest.approx(-2.0)
    assert steps["perplexity_change_pct"].iloc[0] == pytest.approx(-25.0)
    assert steps["marginal_gain_per_gb"].iloc[1] == pytest.approx(1.0)  # 1.0 ppl for 1 GB
    sentences = findings(*RANK_SWEEP)
    assert any(s.startswith("Returns diminish above rank 16:") for s in sentences)
    # rank 16 is within 2% of the best (4.96) at 4/9 of its memory
    sweet = next(s for s in sentences if s.startswith("Sweet-spot rank: 16 "))
    assert "44% of its peak memory (CPU RSS)" in sweet
    # The best of 5 ranks was picked from the data: every pair of them is a comparison it could have shown.
    assert "10 comparisons" in sweet


def test_returns_that_never_diminish_are_reported_as_such():
    runs = [run("a", rank=4, ppl=8.0, mem=2.0), run("b", rank=8, ppl=6.0, mem=3.0)]
    sentences = findings(*runs)
    assert any("had not diminished by the largest rank tried" in s for s in sentences)
    sweet = next(s for s in sentences if s.startswith("Sweet-spot rank: 8, the best rank"))
    assert "every smaller rank is worse" in sweet


def test_pareto_front_keeps_ties_and_drops_dominated_points():
    frame = pd.DataFrame(
        {
            "run_id": ["a", "b", "c", "d", "e"],
            "mem": [1.0, 2.0, 2.0, 3.0, 1.0],
            "ppl": [9.0, 5.0, 5.0, 6.0, 9.5],
        }
    )
    front = pareto_front(frame, "mem", "ppl")
    assert list(front["run_id"]) == ["a", "b", "c"]  # b and c tie; d and e are dominated


def test_missing_axes_yield_only_supported_tables():
    only_ranks = tables_of(*RANK_SWEEP)
    assert "rank" in only_ranks and "modules" not in only_ranks and "quantization" not in only_ranks
    one_run = all_tables(pd.DataFrame([base("nf4", 20.0), run("solo")]), SETTINGS)
    assert set(one_run) == {"time_memory", "pareto_memory", "pareto_time", "decision"}  # one base: no base cost
    sentences = findings(run("solo"))
    assert not any("Sweet-spot" in s or "Returns" in s for s in sentences)


def test_module_table_and_attention_verdict():
    runs = [
        run("qv", modules="q,v", ppl=6.0, params=100),
        run("qkvo", modules="q,k,v,o", ppl=5.0, params=200),
        run("mlp", modules="q,k,v,o,mlp", ppl=4.99, params=600),
    ]
    tables = tables_of(*runs)
    assert list(tables["modules"]["modules"]) == ["qv", "qkvo", "qkvo-mlp"]
    assert "layers_reached" not in tables_of(*[{**r, "target_layers": "q: 32/32 layers"} for r in runs])["modules"]
    layers = ["q: 8/32 layers; v: 8/32 layers", "q: 8/32 layers", "mlp: 32/32 layers"]
    hybrid = tables_of(*[{**r, "target_layers": text} for r, text in zip(runs, layers, strict=True)])
    assert list(hybrid["modules"]["layers_reached"]) == layers  # a hybrid: which layers each group touched
    sentence = next(s for s in findings(*runs) if s.startswith("Target modules"))
    assert "-0.2%" in sentence and "3.0x the trainable parameters" in sentence
    assert "attention-only targeting is enough" in sentence

    runs[2] = run("mlp", modules="q,k,v,o,mlp", ppl=4.0, params=600)
    sentence = next(s for s in findings(*runs) if s.startswith("Target modules"))
    assert "MLP layers add quality" in sentence


def test_quantization_table_with_an_out_of_memory_run():
    runs = [
        run("nf4", quant="nf4", ppl=5.1, mem=3.0),
        run("int8", quant="int8", ppl=5.0, mem=7.5),
        run("bf16", quant="bf16", ppl=5.0, mem=6.0),
        run("fp32", quant="fp32", ppl=float("nan"), mem=float("nan"), status="oom"),
    ]
    quant = tables_of(*runs)["quantization"]
    by_label = quant.set_index("quantization")
    assert by_label.loc["nf4", "quality_change_pct"] == pytest.approx(2.0)
    # fp32 did not fit, so bf16 is the unquantized reference: 1 - 3/6
    assert by_label.loc["nf4", "memory_saved_pct"] == pytest.approx(50.0)
    assert by_label.loc["fp32", "status"] == STATUS_LABELS["oom"] == "does not fit (out of memory)"
    assert math.isnan(by_label.loc["fp32", "perplexity"])
    sentences = findings(*runs)
    assert "Quantization fp32: does not fit (out of memory)." in sentences
    assert any(
        s.startswith("Quantization int8:") and "25% more peak memory than the unquantized" in s for s in sentences
    )
    assert any(s.startswith("Quantization nf4:") and "50% less peak memory" in s for s in sentences)
    assert "Not measured: fp32 does not fit (out of memory)." in sentences


def test_decision_table_picks_best_fitting_run_per_budget_with_ties_on_memory():
    runs = [
        run("small", rank=4, ppl=7.0, mem=1.5),
        run("tie-big", rank=8, ppl=5.0, mem=4.5),
        run("tie-small", rank=16, ppl=5.0, mem=4.0),
        run("best", rank=32, ppl=4.0, mem=7.5),
    ]
    decision = tables_of(*runs)["decision"].set_index("budget_gb")
    assert decision.loc[2, "run_id"] == "small"
    assert decision.loc[5, "run_id"] == "tie-small"
    assert decision.loc[8, "run_id"] == "best"
    none_fit = tables_of(run("huge", mem=50.0))["decision"]
    assert set(none_fit["run_id"]) == {"nothing fits"}
    sentences = findings(*runs)
    assert "Budget 2 GB: small (perplexity 7, 1.50 GB CPU RSS), the best that fits." in sentences
    assert "Budgets 2-8 GB: nothing fits." in findings(run("huge", mem=50.0))


def test_the_budget_table_prefers_the_cheapest_run_within_noise_of_the_best():
    runs = [run("cheap", rank=4, ppl=5.03, mem=2.0, time=5), run("best", rank=32, ppl=5.0, mem=6.0, time=20)]
    decision = tables_of(*runs)["decision"].set_index("budget_gb")
    assert decision.loc[8, "run_id"] == "cheap" and decision.loc[8, "best_run_id"] == "best"
    assert decision.loc[8, "vs_best"].startswith("equivalent; a real but negligible change: +0.6%")
    sentence = next(s for s in findings(*runs) if s.startswith("Budget 8 GB"))
    assert "cheap" in sentence and "the cheapest run equivalent to the best that fits, best" in sentence
    # The same means with noisy rows: the cheap run can no longer be shown equivalent, so the best is kept
    # and the cheaper run is named as inconclusive.
    noisy = tables_of(*runs, noise=8.0, rows=40)["decision"].set_index("budget_gb")
    assert noisy.loc[8, "run_id"] == "best" and noisy.loc[8, "cheaper_inconclusive"] == "cheap"
    # Measured on a CPU: the same choice also on the planner's predicted GPU memory, labelled as such.
    predicted = [
        dict(r, plan_predicted_cuda_gb=g, plan_predicted_cpu_gb=g) for r, g in zip(runs, (3.0, 10.0), strict=True)
    ]
    table = tables_of(table=study(*predicted))["decision"]
    on_gpu = table[table["memory"] == "predicted GPU"].set_index("budget_gb")
    assert on_gpu.loc[5, "run_id"] == "cheap" and on_gpu.loc[8, "run_id"] == "cheap"


def test_the_budget_table_says_how_many_gpus_a_run_needs_when_one_is_too_small():
    """On the planner's GPU predictions a run that does not fit one GPU of the budget fits on the fewest of
    2, 4, 8 whose per-GPU prediction does; fewer GPUs are cheaper than less memory per GPU."""
    per_gpu = {1: 46.0, 2: 31.7, 4: 21.4, 8: 16.0}  # a 70B-shaped QLoRA (bench/sharded_plan.py)
    big = dict(run("big", rank=16, ppl=4.0, mem=6.0), plan_predicted_cuda_gb=per_gpu[1], plan_predicted_cpu_gb=6.0,
               **{f"plan_predicted_cuda_gb_{n}gpu": gb for n, gb in per_gpu.items()})  # fmt: skip
    small = dict(run("small", rank=4, ppl=9.0, mem=2.0), plan_predicted_cuda_gb=6.0, plan_predicted_cpu_gb=2.0,
                 **{f"plan_predicted_cuda_gb_{n}gpu": 6.0 / n + 1 for n in per_gpu})  # fmt: skip
    settings = dataclasses.replace(SETTINGS, memory_budgets_gb=(8, 24, 40, 80))
    table = all_tables(study(big, small), settings, judge_for(study(big, small)))["decision"]
    on_gpu = table[table["memory"] == "predicted GPU"].set_index("budget_gb")
    assert on_gpu.loc[24, "run_id"] == "big" and on_gpu.loc[24, "gpus_needed"] == 4
    assert on_gpu.loc[24, "memory_gb"] == pytest.approx(21.4)
    assert on_gpu.loc[40, "gpus_needed"] == 2 and on_gpu.loc[80, "gpus_needed"] == 1
    assert on_gpu.loc[8, "run_id"] == "small" and on_gpu.loc[8, "gpus_needed"] == 1  # big needs more than 8 x 8 GB
    sentences = headline_findings(study(big, small), settings, judge_for(study(big, small)))
    assert any(s.startswith("Budget 24 GB (predicted GPU memory): big on 4 GPUs (perplexity 4, 21.40 GB per GPU")
               for s in sentences), sentences  # fmt: skip
    measured = table[table["memory"] == "measured"]
    assert set(measured["gpus_needed"].dropna()) == {1}  # as each run was trained


def test_a_sweet_spot_the_data_cannot_settle_is_called_inconclusive():
    sentences = findings(*RANK_SWEEP, noise=30.0, rows=30, noisy=("r16",))
    sentence = next(s for s in sentences if s.startswith("Sweet-spot rank"))
    assert sentence.startswith("Sweet-spot rank: inconclusive. Rank 16 against the best rank 64 is inconclusive")
    assert "validation rows would settle it" in sentence


def test_each_run_gains_against_the_base_in_its_own_format_and_the_base_cost_is_reported():
    runs = [run("nf4", quant="nf4", ppl=5.0, mem=2.0), run("fp32", quant="fp32", ppl=4.5, mem=4.0)]
    table = study(*runs)
    costs = all_tables(table, SETTINGS)["base_quantization"].set_index("run_id")
    assert costs.loc["base-fp32", "perplexity_change_pct"] == 0
    assert costs.loc["base-nf4", "perplexity_change_pct"] == pytest.approx(100 * (20 / 19 - 1))
    sentences = headline_findings(table, SETTINGS)
    best = "Best run: fp32 lowers validation perplexity from 19 (the base model in fp32, no adapter) to 4.5."
    assert best in sentences
    assert any(s.startswith("Cost of quantizing the base model (no adapter): perplexity 19 with fp32") and
               "nf4 20 (+5.3%)" in s for s in sentences)  # fmt: skip
    judged = headline_findings(table, SETTINGS, judge_for(table))
    cost = next(s for s in judged if s.startswith("Cost of quantizing"))
    assert "Against fp32: nf4 worse (+5.3% [" in cost and "evaluation noise only" in cost
    assert list(prepare(table)["base_perplexity"])[2:] == [20.0, 19.0]


def test_mixed_resolved_dtypes_and_devices_are_flagged():
    runs = [
        run("a", rank=4, **{"training.compute_dtype": "auto", "compute_dtype": "bf16"}),
        run("b", rank=8, **{"training.compute_dtype": "auto", "compute_dtype": "fp16"}),
    ]
    table = study(*runs).assign(**{"capability.summary": ["gpu A100", "gpu A100", "gpu A100", "gpu V100"]})
    warnings = [s for s in headline_findings(table, SETTINGS) if s.startswith("Warning")]
    assert len(warnings) == 2
    assert "nf4 and compute dtype auto resolved to different dtypes" in warnings[0] and "fp16 (1 runs)" in warnings[0]
    assert "2 kinds of device" in warnings[1]
    same = study(*runs).assign(compute_dtype="bf16", **{"training.compute_dtype": "auto"})
    assert not [s for s in headline_findings(same, SETTINGS) if s.startswith("Warning")]


def test_memory_label_says_cpu_when_no_gpu_was_used():
    assert "CPU" in memory_label(prepare(study(*RANK_SWEEP)))
    gpu = study(*RANK_SWEEP).assign(memory_kind="cuda_nvml_used")
    assert memory_label(prepare(gpu)).startswith("peak GPU memory")


def test_accuracy_columns_disappear_when_the_data_has_no_exact_answers():
    table = study(*RANK_SWEEP).assign(accuracy=float("nan"))
    assert "accuracy" not in all_tables(table, SETTINGS)["rank"].columns


def test_the_reference_claims_are_answered_from_the_data():
    from lora_study.questions.reference_claims import CONTRADICTED, NOT_TESTED, SUPPORTED, reference_claims

    def answers(*runs, memory: str = "peak GPU memory (NVML)", predicted=None, **options) -> dict[str, str]:
        table = study(*runs)
        judge = judge_for(table, **options)
        claims = reference_claims(all_tables(table, SETTINGS, judge), judge, SETTINGS, memory, predicted)
        return {claim.claim.split(":")[0].split(" ")[0] + str(i): claim.answer for i, claim in enumerate(claims)}

    ranks = list(answers(*RANK_SWEEP).values())
    assert ranks[:2] == [SUPPORTED, SUPPORTED]  # r16 within 2% of r64 at 44% memory; r32 -> r64 gains 0.4%
    assert ranks[2:] == [NOT_TESTED] * 5  # no module or quantization sweep, no full fine-tuning
    modules = [run("qv", modules="q,v", ppl=6.0, params=100), run("qkvo", ppl=5.0, params=200),
               run("mlp", modules="q,k,v,o,mlp", ppl=4.99, params=600)]  # fmt: skip
    assert list(answers(*modules).values())[2:4] == [SUPPORTED, SUPPORTED]
    modules[2] = run("mlp", modules="q,k,v,o,mlp", ppl=4.0, params=600)  # a 20 % gain: not "about 2 %"
    assert list(answers(*modules).values())[3] == CONTRADICTED
    quant = [run("nf4", quant="nf4", ppl=5.1, mem=3.0), run("bf16", quant="bf16", ppl=5.0, mem=6.0)]
    assert list(answers(*quant).values())[4:6] == [SUPPORTED, SUPPORTED]  # +2 % < 3 %; 50 % less memory
    # Measured on a CPU: process RSS cannot answer a GPU-memory claim; the planner's prediction can, labelled.
    assert list(answers(*quant, memory="peak process RSS (CPU)").values())[5] == NOT_TESTED
    halved = answers(*quant, memory="peak process RSS (CPU)", predicted={"nf4": 2.0, "bf16": 4.0})
    assert list(halved.values())[5] == SUPPORTED + " (predicted)"  # 50 % less predicted GPU memory
    same = answers(*quant, memory="peak process RSS (CPU)", predicted={"nf4": 3.8, "bf16": 4.0})
    assert list(same.values())[5] == CONTRADICTED + " (predicted)"
    quant[0] = run("nf4", quant="nf4", ppl=5.5, mem=5.5)
    assert list(answers(*quant).values())[4:6] == [CONTRADICTED, CONTRADICTED]
