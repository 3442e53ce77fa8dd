"""The field's claims (lora_study.questions.field_claims) on hand-built run tables with constructed per-row
scores: each answer follows from the verdicts, and a claim without its runs is "not tested"."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from test_findings import SETTINGS, judge_for, run, study

from lora_study.analysis.runs import prepare
from lora_study.questions.field_claims import (
    all_layers_claim,
    batch_claim,
    forgetting_claim,
    learning_rate_rank_claim,
    learning_rate_ratio_claim,
)
from lora_study.questions.forgetting import forgetting_table
from lora_study.stats.verdicts import Evidence


def lora(run_id: str, ppl: float, lr: float = 1e-3, rank: int = 16, **extra) -> dict:
    row = run(run_id, rank=rank, quant="bf16", ppl=ppl, **{k: v for k, v in extra.items() if k in ("params",)})
    return {**row, "method": "lora", "training.learning_rate": lr, "double_quant": False,
            **{k: v for k, v in extra.items() if k not in ("params",)}}  # fmt: skip


def full(run_id: str, ppl: float, lr: float = 1e-4, **extra) -> dict:
    row = lora(run_id, ppl, lr, rank=0, **extra)
    return {**row, "method": "full", "modules": "", "alpha": 0.0, "trainable_params": 135_000_000}


def answers(*runs, general: dict[str, float] | None = None):
    table = study(*runs)
    prepared = prepare(table.assign(general_perplexity=table["run_id"].map(general or {})))
    judge = judge_for(table)
    if general:
        general_table = table.assign(perplexity=table["run_id"].map(general).fillna(math.nan))
        judge.general = judge_for(general_table).evidence
    return prepared, judge


def test_learning_rate_ratio():
    runs = [lora("l-3", 7.0, 1e-3), lora("l-2", 5.0, 1e-2), lora("l-1", 8.0, 1e-1),
            full("f-4", 6.0, 1e-4), full("f-3", 5.0, 1e-3), full("f-2", 9.0, 1e-2)]  # fmt: skip
    prepared, judge = answers(*runs)
    claim = learning_rate_ratio_claim(prepared, judge, SETTINGS)
    assert claim.answer == "supported" and "best LoRA 0.01 (l-2), best full 0.001 (f-3): 10x" in claim.evidence
    far = [lora("l-4", 7.0, 1e-4), lora("l-3", 5.0, 1e-3), lora("l-2", 7.0, 1e-2),
           full("f-4", 7.0, 1e-4), full("f-3", 5.0, 1e-3), full("f-2", 9.0, 1e-2)]  # fmt: skip
    assert learning_rate_ratio_claim(*answers(*far), SETTINGS).answer == "contradicted"  # 1x
    tie = [lora("l-4", 7.0, 1e-4), lora("l-3", 5.0, 1e-3), lora("l-2", 5.0, 1e-2), *far[3:]]
    assert learning_rate_ratio_claim(*answers(*tie), SETTINGS).answer == "inconclusive"  # LoRA's best not pinned
    edge = [lora("l-3", 7.0, 1e-3), lora("l-2", 6.0, 1e-2), lora("l-1", 5.0, 1e-1), *runs[3:]]
    claim = learning_rate_ratio_claim(*answers(*edge), SETTINGS)
    assert claim.answer == "inconclusive" and "lora's best is its sweep's largest learning rate" in claim.evidence
    assert learning_rate_ratio_claim(*answers(*runs[:3]), SETTINGS).answer == "not tested"  # no full sweep


def test_learning_rate_and_rank_at_one_alpha():
    def grid(cells, alpha=None):
        return [{**lora(f"r{r}-lr{lr:g}", ppl, lr, rank=r), **({"alpha": alpha} if alpha else {})}
                for (r, lr), ppl in cells.items()]  # fmt: skip

    moves = {(4, 1e-3): 8.0, (4, 1e-2): 6.0, (16, 1e-3): 5.0, (16, 1e-2): 7.0}
    prepared, judge = answers(*grid(moves, alpha=16.0))
    assert learning_rate_rank_claim(prepared, judge, SETTINGS).answer == "contradicted"
    stays = {(4, 1e-4): 7.0, (4, 1e-3): 6.0, (4, 1e-2): 7.0, (16, 1e-4): 6.0, (16, 1e-3): 5.0, (16, 1e-2): 6.0}
    prepared, judge = answers(*grid(stays, alpha=16.0))
    assert learning_rate_rank_claim(prepared, judge, SETTINGS).answer == "supported"
    prepared, judge = answers(*grid(stays))  # alpha = 2r: not the claim's condition
    claim = learning_rate_rank_claim(prepared, judge, SETTINGS)
    assert claim.answer == "not tested" and "at one alpha" in claim.evidence


def test_all_layers_against_attention_only_at_equal_parameters():
    attention = {**lora("qkvo-r16", 5.0), "modules": "q,k,v,o", "trainable_params": 61440}
    everywhere = {**lora("all-r6", 4.5, rank=6), "modules": "q,k,v,o,mlp", "trainable_params": 61056}
    prepared, judge = answers(attention, everywhere)
    claim = all_layers_claim(prepared, judge)
    assert claim.answer == "supported" and claim.evidence.startswith("all-r6 vs qkvo-r16 (0.99x the parameters)")
    prepared, judge = answers(attention, {**everywhere, "perplexity": 5.5})
    assert all_layers_claim(prepared, judge).answer == "contradicted"
    prepared, judge = answers(attention, {**everywhere, "trainable_params": 200_000})  # not equal parameters
    assert all_layers_claim(prepared, judge).answer == "not tested"


def test_lora_forgets_less_than_full_finetuning_at_equal_learning():
    runs = [lora("lora", 5.0), full("full", 5.0)]
    prepared, judge = answers(*runs, general={"base-bf16": 30.0, "lora": 30.3, "full": 33.0})
    prepared = prepared.assign(base_perplexity=prepared["perplexity"])  # no base of this format in the helper
    table = forgetting_table_for(prepared, judge)
    claim = forgetting_claim(table, prepared, judge, SETTINGS)
    assert claim.answer == "supported" and claim.evidence.startswith("lora vs full: learning equivalent")
    prepared, judge = answers(lora("lora", 9.0), full("full", 5.0), general={"lora": 30.0, "full": 33.0})
    claim = forgetting_claim(forgetting_table_for(prepared, judge), prepared, judge, SETTINGS)
    assert claim.answer == "inconclusive" and "no LoRA run is shown to learn as much as full" in claim.evidence
    assert forgetting_claim(None, prepared, judge, SETTINGS).answer == "not tested"


def forgetting_table_for(prepared: pd.DataFrame, judge) -> pd.DataFrame:
    """The forgetting table with a base model in the runs' format (the helper's study has nf4 and fp32 only)."""
    base = {**prepared.iloc[0].to_dict(), "run_id": "base-bf16", "quantization": "bf16", "double_quant": False,
            "quant_label": "bf16", "general_perplexity": 30.0, "perplexity": 20.0}  # fmt: skip
    judge.general["base-bf16"] = Evidence(judge.general["lora"].nll * math.log(30.0) / math.log(30.3),
                                          judge.general["lora"].tokens, trained=False)  # fmt: skip
    judge.evidence["base-bf16"] = judge.evidence[prepared.iloc[-1]["run_id"]]
    rows = pd.concat([prepared, pd.DataFrame([base])], ignore_index=True)
    rows["base_perplexity"] = np.where(rows["is_baseline"], np.nan, 20.0)
    return forgetting_table(rows, judge, SETTINGS)


def test_batch_size_degrades_lora_but_not_full_finetuning():
    def sweep(method, ppls):
        make = lora if method == "lora" else full
        pairs = zip((4, 32), ppls, strict=True)
        return [{**make(f"{method}-bs{bs}", ppl), "training.batch_size": bs} for bs, ppl in pairs]

    prepared, judge = answers(*sweep("lora", (5.0, 6.0)), *sweep("full", (5.0, 5.0)))
    claim = batch_claim(prepared, judge, SETTINGS)
    assert claim.answer == "supported" and "lora batch 32 vs 4: worse" in claim.evidence
    prepared, judge = answers(*sweep("lora", (5.0, 5.0)), *sweep("full", (5.0, 6.0)))
    assert batch_claim(prepared, judge, SETTINGS).answer == "contradicted"
    prepared, judge = answers(*sweep("lora", (5.0, 6.0)))
    assert batch_claim(prepared, judge, SETTINGS).answer == "not tested"
