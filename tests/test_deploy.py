"""Deployment: the merge check tells a correct merge from a wrong one; serving latency leaves warm-up out."""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import pytest
import torch

from conftest import prepared_inputs, tiny_study_config, train_and_evaluate
from lora_study.core.paths import EvalOutputs
from lora_study.measure.deploy import (
    DeploySettings,
    ServingSettings,
    measure_serving,
    run_deploy,
    serving_prompt,
    timed_calls,
)
from lora_study.measure.evaluate import evaluate_run
from lora_study.measure.forms import MERGE_FLAGGED, MERGE_OK, MERGE_OUTCOMES, MERGED_16BIT, MERGED_REQUANTIZED, UNMERGED
from lora_study.prepare.data import load_split
from lora_study.stats.verdicts import decide
from lora_study.study.sweep import RunSpec, expand_study

SERVING = ServingSettings(prompt_tokens=12, new_tokens=4, batch_size=2, warmup=1, repeats=2)


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """Two real adapters (fp32 and NF4 base) trained long enough to move perplexity, each evaluated by
    rule evaluate's own function (its examples.csv is the merge check's reference)."""
    workdir = tmp_path_factory.mktemp("deploy")
    config, manifest, splits = prepared_inputs(tiny_llama, tiny_study_config(tiny_llama), workdir)
    runs = {}
    for run_id in ("r4-qv-fp32", "r4-qv-nf4"):
        spec = expand_study(config)[run_id]
        run = replace(spec, training=spec.training.replace(max_steps=12, learning_rate=1e-2))
        out = workdir / run_id
        runs[run_id] = (run, out, train_and_evaluate(run, config, manifest, splits, out, threads=1).perplexity)
    base_run = RunSpec("base-fp32", 0, 0.0, (), "fp32", False, None, is_baseline=True)
    outputs = EvalOutputs(workdir / "b.json", workdir / "b.jsonl", workdir / "b.csv")
    base = evaluate_run(base_run, config["evaluation"], config["training"], manifest, splits, None, outputs, threads=1)
    return config, manifest, workdir, runs, base.perplexity


def deploy(trained, run_id: str, merge_base_dir=None, serving: ServingSettings | None = None):
    config, manifest, workdir, runs, _ = trained
    run, out, _ = runs[run_id]
    settings = DeploySettings(merge_check=True, tolerance=0.01, serving=serving, save_merged=False,
                              batch_size=config["evaluation"]["batch_size"])  # fmt: skip
    return run_deploy(run, settings, config["training"], manifest, workdir / "splits", out / "adapter",
                      out / "examples.csv", threads=1, train_status="ok", merge_base_dir=merge_base_dir)  # fmt: skip


@pytest.fixture(scope="module")
def other_base(tiny_llama, tmp_path_factory):
    """The tiny Llama with every weight perturbed: a base the adapters were not trained on."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    out = tmp_path_factory.mktemp("other-base")
    model.save_pretrained(out)
    return str(out)


def test_the_adapters_change_the_model(trained):
    *_, runs, base_perplexity = trained
    for _, _, perplexity in runs.values():
        assert perplexity < 0.9 * base_perplexity  # else merging them right or wrong would look the same


def test_a_correct_merge_passes(trained):
    record = deploy(trained, "r4-qv-fp32")
    check = record["merge"][MERGED_16BIT]
    assert check["outcome"] == MERGE_OK, check["describe"]
    assert abs(check["change"]) < 1e-3
    assert MERGED_REQUANTIZED not in record["merge"]  # an unquantized run has nothing to re-quantize


def test_a_merge_into_another_base_is_flagged(trained, other_base):
    for run_id in ("r4-qv-fp32", "r4-qv-nf4"):
        record = deploy(trained, run_id, merge_base_dir=other_base)
        check = record["merge"][MERGED_16BIT]
        assert check["outcome"] == MERGE_FLAGGED, check["describe"]
        assert check["verdict"] == "worse"


def test_a_quantized_adapter_is_checked_merged_and_requantized(trained):
    record = deploy(trained, "r4-qv-nf4", serving=SERVING)
    assert set(record["merge"]) == {MERGED_16BIT, MERGED_REQUANTIZED}
    for check in record["merge"].values():
        # The recorded outcome is the verdict its own evidence gives (change, standard error, df; m = 1).
        df = math.inf if check["df"] is None else check["df"]
        low, high, _, _, verdict = decide(math.log1p(check["change"]), check["se"], df, "perplexity", 0.01, 1)
        assert (check["verdict"], check["outcome"]) == (verdict.value, MERGE_OUTCOMES[verdict]), check["describe"]
        assert (check["low"], check["high"]) == pytest.approx((low, high)) and low <= check["change"] <= high
    # Served as evaluated (base NF4 + adapter) and as deployed after merging (re-quantized NF4).
    assert set(record["serving"]) == {UNMERGED, MERGED_REQUANTIZED}
    for cost in record["serving"].values():
        assert cost["ms_per_token_b1"] > 0 and cost["tokens_per_s_b2"] > 0 and cost["peak_memory_gb"] > 0


def test_timing_leaves_warm_up_out_and_reads_both_parts_from_one_generation(monkeypatch):
    """On a clock that each step moves by a known amount, so the check does not depend on the machine's speed:
    the prompt is put at once, the first token 3 s later (40 s on the first, cold call), then 2 s of decoding."""
    import types

    from lora_study.measure import deploy as deploy_module

    clock = [0.0]
    calls = []

    def generation(streamer):
        calls.append(clock[0])
        streamer.put("prompt")
        clock[0] += 40.0 if len(calls) == 1 else 3.0
        streamer.put("first token")
        clock[0] += 2.0
        streamer.put("second token")

    monkeypatch.setattr(deploy_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    timed = timed_calls(generation, warmup=1, repeats=3, synchronize=lambda: None)
    assert len(calls) == 4 and timed == [(3.0, 2.0)] * 3
    calls.clear()
    untimed_warmup = timed_calls(generation, warmup=0, repeats=3, synchronize=lambda: None)
    assert untimed_warmup == [(40.0, 2.0), (3.0, 2.0), (3.0, 2.0)]  # without warm-up the cold call would count


def test_serving_generates_the_configured_tokens(trained):
    from transformers import AutoModelForCausalLM

    _, manifest, workdir, *_ = trained
    rows = list(load_split(workdir / "splits", "validation"))
    prompt = serving_prompt(rows, SERVING.prompt_tokens)
    assert len(prompt) == SERVING.prompt_tokens
    model = AutoModelForCausalLM.from_pretrained(manifest["path"]).eval()
    produced = []
    original = model.generate

    def counting_generate(**kwargs):
        output = original(**kwargs)
        produced.append((output.shape[0], output.shape[1] - kwargs["input_ids"].shape[1]))
        return output

    model.generate = counting_generate
    cost = measure_serving(model, prompt, SERVING, torch.device("cpu"), contextlib.nullcontext, pad_id=0)
    # Per batch size: warm-up + repeats generations of new_tokens, each timed from its own token times.
    assert len(produced) == (SERVING.warmup + SERVING.repeats) * len(SERVING.batch_sizes)
    assert {shape for shape in produced} == {(b, SERVING.new_tokens) for b in (1, 2)}
    assert set(cost) == {f"{k}_b{b}" for k in ("ttft_ms", "ms_per_token", "tokens_per_s", "spread_pct") for b in (1, 2)}
    assert all(cost[f"{k}_b{b}"] > 0 for k in ("ttft_ms", "ms_per_token", "tokens_per_s") for b in (1, 2))


def test_the_merge_table_keeps_every_seed_and_corrects_over_every_check():
    import pandas as pd

    from lora_study.measure.forms import MERGE_UNCLEAR
    from lora_study.questions.merge_and_serving import merge_table

    # A +2 % merge change whose interval excludes 0 when judged alone (m = 1: flagged) but not among the 4
    # checks the table holds (2 seeds x 2 forms): the sentence counting flags over all of them must correct.
    def form(run_id: str, name: str, change: float) -> dict:
        return {"run_id": run_id, "config_id": "r4-qv-nf4", "form": name, "merge_change": change,
                "merge_perplexity": 5.0 * (1 + change), "merge_reference_perplexity": 5.0, "merge_se": 0.0095,
                "merge_df": float("inf"), "merge_outcome": MERGE_FLAGGED, "merge_describe": "as recorded"}  # fmt: skip

    deploy = pd.DataFrame([form(run, name, 0.02) for run in ("r4-qv-nf4-s0", "r4-qv-nf4-s1")
                           for name in (MERGED_16BIT, MERGED_REQUANTIZED)])  # fmt: skip
    runs = pd.DataFrame({"run_id": ["r4-qv-nf4"], "quant_label": ["nf4"]})
    table = merge_table(runs, deploy, tolerance=0.01)
    assert list(table["run_id"]) == ["r4-qv-nf4-s0", "r4-qv-nf4-s1"] and table.attrs["checks"] == 4
    assert (table[f"{MERGED_16BIT}_check"] == MERGE_UNCLEAR).all()
    assert "4 checks" in table[f"{MERGED_16BIT}_detail"].iloc[0]
    assert (merge_table(runs, deploy)[f"{MERGED_16BIT}_check"] == MERGE_FLAGGED).all()  # no tolerance: as recorded
