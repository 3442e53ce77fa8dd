"""LoRA variants (DoRA, rsLoRA, the initialisations, rank patterns) against plain LoRA at the same rank, targets and
format."""

from __future__ import annotations

import pandas as pd

from lora_study.analysis.runs import (
    trained_runs,
)
from lora_study.questions.common import (
    measured,
    sig,
    status_column,
    training_columns,
    with_accuracy,
    with_verdicts,
)
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.stats.verdicts import GENERAL, Judge
from lora_study.study.methods import FULL, LORA, lora_scale


def methods_table(runs: pd.DataFrame, judge: Judge, settings: FindingSettings) -> pd.DataFrame | None:
    """LoRA variants side by side: one block per rank, targets, format and training settings holding two or
    more methods, each variant against the block's plain LoRA run (tolerance min_relative_gain; m = the
    block's variants). A variant trained with its own settings (methods.<method>) forms its own block."""
    trained = trained_runs(runs)
    adapters = trained[trained["method"] != FULL]
    keys = ["rank", "modules_label", "quant_label", *training_columns(adapters)]
    blocks = [group for _, group in adapters.groupby(keys, dropna=False, sort=False) if group["variant"].nunique() > 1]
    if not blocks:
        return None
    group = pd.concat(blocks)
    table = pd.DataFrame(
        {
            "run_id": group["run_id"],
            "method": group["variant"],  # lora+rp<name>: a rank pattern is a variant of its method
            "rank": group["rank"],
            "alpha": group["alpha"],
            "scale": [
                lora_scale(m, a, r) for m, a, r in zip(group["method"], group["alpha"], group["rank"], strict=True)
            ],
            "modules": group["modules_label"],
            "quantization": group["quant_label"],
            **measured(group, "perplexity", "accuracy", "peak_memory_gb", "train_wall_s"),
            "trainable_params": group["trainable_params"].astype("Int64"),
            "adapter_params": group["adapter_params"].astype("Int64") if "adapter_params" in group else pd.NA,
            "status": status_column(group),
        }
    ).reset_index(drop=True)
    table = table[with_accuracy(list(table.columns), table)]
    # With evaluation.forgetting each variant is also judged against the same run on general text (the paired
    # test on its rows, tolerance sweet_spot_tolerance like the forgetting table).
    forgetting = "general_perplexity" in group and group["general_perplexity"].notna().any()
    pairs = []  # per row: (run, the plain LoRA run it is judged against or "", m = its block's variants)
    for block in blocks:
        lora = block[block["variant"] == LORA]  # uniform rank
        reference = lora.iloc[0]["run_id"] if len(lora) else ""
        variants = (block["variant"] != LORA).sum()
        pairs += [(run_id, reference if reference and variant != LORA else "", variants)
                  for run_id, variant in zip(block["run_id"], block["variant"], strict=True)]  # fmt: skip
    references = [reference for _, reference, _ in pairs]
    comparisons = [judge.compare(run_id, reference, "perplexity", settings.min_relative_gain, m) if reference
                   else None for run_id, reference, m in pairs]  # fmt: skip
    general = [judge.compare(run_id, reference, GENERAL, settings.sweet_spot_tolerance, m)
               if reference and forgetting else None for run_id, reference, m in pairs]  # fmt: skip
    table.insert(1, "compared_with", references)
    table = with_verdicts(table, comparisons)
    if forgetting:
        table["general_perplexity"] = group["general_perplexity"].to_numpy()
        table["general_verdict"] = [c.verdict.value if c else "" for c in general]
        table.attrs["general"] = general
    return table


def methods_finding(table: pd.DataFrame | None) -> str | None:
    """Per block, each variant against plain LoRA at the same rank, targets, format and settings."""
    if table is None:
        return None
    by_id = table.set_index("run_id")
    sentences = []
    for reference, rows in table.groupby("compared_with", sort=False):
        comparisons = table.attrs["comparisons"]
        judged = [(i, row, comparisons[i]) for i, row in rows.iterrows() if comparisons[i] is not None]
        if not reference or not judged:
            continue
        lora = by_id.loc[reference]
        general = table.attrs.get("general")
        parts = [f"{row['method']} {sig(row['perplexity'])}{_params_note(row, lora)}: {c.describe()}"
                 + (f"; on general text {general[i].describe()}" if general and general[i] else "")
                 for i, row, c in judged]  # fmt: skip
        sentences.append(
            f"Methods at rank {int(lora['rank'])}, {lora['modules']}, {lora['quantization']} against plain LoRA "
            f"({reference}, perplexity {sig(lora['perplexity'])}): " + "; ".join(parts) + "."
        )
    return " ".join(sentences) or None


def _params_note(row: pd.Series, lora: pd.Series) -> str:
    """The variant's trainable parameters where they differ from plain LoRA's by over 1 % (EVA's and a rank
    pattern's redistributed ranks): a comparison at unequal size says so."""
    mine, theirs = row["trainable_params"], lora["trainable_params"]
    if pd.isna(mine) or pd.isna(theirs) or not theirs or abs(mine / theirs - 1) <= 0.01:
        return ""
    return f" ({int(mine):,} trainable parameters, {mine / theirs:.2f}x LoRA's)"


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return {"methods": methods_table(study.runs, study.judge, study.settings)}


def findings(study: Study) -> list[str | None]:
    return [methods_finding(study.tables.get("methods"))]


QUESTION = Question(
    anchor="methods",
    title="LoRA variants against plain LoRA",
    tables=tables,
    findings=findings,
    definitions={
        "methods": "each LoRA variant against the plain LoRA run of its block (same rank, target modules, weight "
        "format and training settings; tolerance min_relative_gain, m = the number of variants in the block); "
        "scale = alpha/r (rslora: alpha/sqrt(r)); with evaluation.forgetting, general_verdict is the same "
        "comparison on general text (forgetting; tolerance sweet_spot_tolerance); a rank pattern's run is "
        "method+rp<name>.",
    },
)
