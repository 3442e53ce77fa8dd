"""What a run forgets: the general text it is measured on, and the paired verdict against its base model on
constructed data with a known truth."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lora_study.core.errors import UserError
from lora_study.prepare.general import PYTHON_DOCS, general_split, python_docs_paragraphs
from lora_study.questions.forgetting import forgetting_table
from lora_study.report.question import FindingSettings
from lora_study.stats import calibration
from lora_study.stats import verdicts as verdicts_module
from lora_study.stats.verdicts import GENERAL, Evidence, Judge


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def test_the_python_docs_give_prose_windows_the_same_every_time(tokenizer):
    paragraphs = python_docs_paragraphs()
    assert len(paragraphs) > 300 and not any(p.startswith((" ", "\t")) for p in paragraphs)
    settings = {"source": PYTHON_DOCS, "rows": 16, "max_length": 64}
    rows = general_split(settings, tokenizer)
    assert len(rows) == 16 and all(len(r["input_ids"]) == 64 and r["prompt_length"] == 1 for r in rows)
    assert rows == general_split(settings, tokenizer)  # built in every evaluation: must not vary
    assert len({tuple(r["input_ids"]) for r in rows}) == 16  # spread over the text, no window twice


def test_a_local_text_replaces_the_default_and_too_little_text_is_refused(tokenizer, tmp_path):
    text = tmp_path / "general.txt"
    text.write_text("\n\n".join(f"Paragraph {i} says something plain about the weather and the sea." for i in
                                range(200)))  # fmt: skip
    rows = general_split({"source": str(text), "rows": 4, "max_length": 32}, tokenizer)
    assert len(rows) == 4
    with pytest.raises(UserError, match="fewer than rows 10000"):
        general_split({"source": str(text), "rows": 10000, "max_length": 32}, tokenizer)
    with pytest.raises(UserError, match="no such file"):
        general_split({"source": str(tmp_path / "missing.txt"), "rows": 4, "max_length": 32}, tokenizer)


def test_the_forgetting_verdict_says_worse_as_often_as_it_claims_and_finds_a_real_rise():
    """Simulated studies with a known truth (lora_study.stats.calibration: 3 seeds against the untrained base, as
    forgetting is judged) whose per-row scores are the general text's: with no change 'better'/'worse' within the
    calibration suite's band and the interval holds the truth; at a real +5 % 'worse' as often as the validation
    metric finds it, on identical verdicts and intervals (the same test on other rows, seed noise included)."""
    scenario = calibration.SCENARIOS[2]
    assert scenario.reference_seeds == 0
    rng = np.random.default_rng(7)
    datasets = 300
    false = covered = found = 0
    for change in (0.0, calibration.REAL_CHANGE):
        for _ in range(datasets):
            simulated, candidates, base = calibration.simulate_study(scenario, change, rng, verdicts_module)
            general = Judge({}, general=simulated.evidence).compare(candidates[0], base, GENERAL, calibration.TOLERANCE)
            validation = simulated.compare(candidates[0], base, "perplexity", calibration.TOLERANCE)
            assert (general.verdict, general.low, general.high) == (validation.verdict, validation.low, validation.high)
            if change == 0.0:
                false += general.verdict.value in ("better", "worse")
                covered += general.low <= 0 <= general.high
            else:
                found += general.verdict.value == "worse"
    assert 0.01 <= false / datasets <= 0.08
    assert 0.92 <= covered / datasets <= 0.99
    assert found / datasets >= 0.5  # +5 % against a 2 % tolerance, 3 seeds: measured 0.61 here (300 studies, seed 7)
    assert "seed" in general.sources and general.metric == GENERAL and "%" in general.describe()


def run_row(run_id: str, ppl: float, general: float, *, base: bool = False, method: str = "lora") -> dict:
    return {"run_id": run_id, "config_id": run_id, "is_baseline": base, "quantization": "nf4", "double_quant": True,
            "method": method, "status": "ok", "fits": True, "perplexity": ppl, "general_perplexity": general,
            "base_perplexity": 20.0}  # fmt: skip


def constructed_judge(shifts: dict[str, float], rows: int = 64) -> Judge:
    """Per-row general-text NLL: the base's rows, and each run's the same rows times (1 + shift) plus noise."""
    rng = np.random.default_rng(0)
    tokens = np.full(rows, 127.0)
    base = rng.normal(3.0, 0.5, rows) * tokens
    general = {"base-nf4": Evidence(base[None, :], tokens, trained=False)}
    for run_id, shift in shifts.items():
        nll = base * (1 + math.log1p(shift) / 3.0) + rng.normal(0, 0.5, rows)
        general[run_id] = Evidence(nll[None, :], tokens, seed_ids=(0,), trained=True)
    return Judge({}, general=general)


def test_the_forgetting_table_judges_each_run_against_its_base_on_constructed_rows():
    shifts = {"forgets": 0.10, "keeps": 0.0}
    runs = pd.DataFrame([run_row("base-nf4", 20.0, 30.0, base=True), run_row("forgets", 10.0, 33.0),
                         run_row("keeps", 12.0, 30.0)])  # fmt: skip
    table = forgetting_table(runs, constructed_judge(shifts), FindingSettings(0.02, 0.01, (8,)))
    by_run = table.set_index("run_id")
    assert by_run.loc["forgets", "forgets"] == "worse" and by_run.loc["keeps", "forgets"] == "equivalent"
    assert by_run.loc["forgets", "forgetting_pct"] == pytest.approx(10.0)
    assert by_run.loc["forgets", "learning_pct"] == pytest.approx(-50.0)
    assert by_run["pareto"].all()  # one learns more, the other forgets less
