"""What quantizing the base model costs before any adapter is trained."""

from __future__ import annotations

import pandas as pd

from lora_study.analysis.runs import (
    baselines,
)
from lora_study.questions.common import (
    dtype_columns,
    measured,
    reference_row,
    sig,
    status_column,
    with_accuracy,
)
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.stats.verdicts import (
    Judge,
)


def base_quantization_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """The base model (no adapter) per weight format vs the unquantized base: what quantizing it costs."""
    base = baselines(runs)
    if len(base) < 2:
        return None
    reference = reference_row(base[base["fits"]])
    reference_ppl = float(reference["perplexity"]) if reference is not None else float("nan")
    table = pd.DataFrame(
        {
            "run_id": base["run_id"],
            "quantization": base["quant_label"],
            **dtype_columns(base),
            **measured(base, "perplexity", "accuracy", "peak_memory_gb"),
            "perplexity_change_pct": 100 * (base["perplexity"] - reference_ppl) / reference_ppl,
            "status": status_column(base),
        }
    )
    return table[with_accuracy(list(table.columns), table)].reset_index(drop=True)


def base_quantization_finding(table: pd.DataFrame | None, judge: Judge, settings: FindingSettings) -> str | None:
    """One sentence: each quantized base's perplexity against the unquantized base's, with its verdict
    (tolerance sweet_spot_tolerance, m = the quantized bases)."""
    if table is None:
        return None
    fitting = table.dropna(subset=["perplexity"])
    ref = reference_row(fitting)  # the table's quantization labels of unquantized bases are their formats
    quantized = fitting.drop(ref.name) if ref is not None else fitting.iloc[0:0]
    if ref is None or quantized.empty:
        return None
    parts = [f"{r['quantization']} {sig(r['perplexity'])} ({r['perplexity_change_pct']:+.1f}%)"
             for _, r in quantized.iterrows()]  # fmt: skip
    verdicts = []
    for _, row in quantized.iterrows():
        result = judge.compare(row["run_id"], ref["run_id"], "perplexity", settings.sweet_spot_tolerance,
                               len(quantized))  # fmt: skip
        verdicts.append(f"{row['quantization']} {result.describe() if result else 'not judged'}")
    return (
        f"Cost of quantizing the base model (no adapter): perplexity {sig(ref['perplexity'])} with "
        f"{_weights_text(ref)} weights; "
        + ", ".join(parts)
        + f". Against {_weights_text(ref)}: "
        + "; ".join(verdicts)
        + ". Each run's gain is measured against the base model in its own format."
    )


def _weights_text(row: pd.Series) -> str:
    label = str(row["quantization"])
    resolved = row.get("weight_format")
    return f"{label} ({resolved})" if isinstance(resolved, str) and resolved != label else label


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return {"base_quantization": base_quantization_table(study.runs)}


def findings(study: Study) -> list[str | None]:
    return [base_quantization_finding(study.tables.get("base_quantization"), study.judge, study.settings)]


QUESTION = Question(
    anchor="base-model-cost",
    title="Cost of quantizing the base model (no adapter)",
    tables=tables,
    findings=findings,
    definitions={
        "base_quantization_cost": "(perplexity of the base model in a weight format - perplexity of the "
        "unquantized base model) / perplexity of the unquantized base model: what quantizing the base model "
        "costs before any adapter is trained.",
    },
)
