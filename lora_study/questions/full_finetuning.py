"""How much of full fine-tuning's improvement each adapter recovers, at what memory and time."""

from __future__ import annotations

import pandas as pd

from lora_study.analysis.runs import (
    baselines,
    trained_runs,
)
from lora_study.questions.common import (
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
from lora_study.study.methods import FULL


def full_reference(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series] | None:
    """(best fitting full fine-tuning run, the unquantized base model), or None without both."""
    trained = trained_runs(runs)
    full = trained[(trained["method"] == FULL) & trained["fits"]].dropna(subset=["perplexity"])
    base = reference_row(baselines(runs).dropna(subset=["perplexity"]))
    if full.empty or base is None:
        return None
    return full.sort_values("perplexity").iloc[0], base


def full_share_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """Per adapter run: the share of full fine-tuning's improvement it recovers, against the unquantized base,
    and its memory and time relative to full fine-tuning."""
    reference = full_reference(runs)
    if reference is None:
        return None
    full, base = reference
    trained = trained_runs(runs)
    adapters = trained[trained["method"] != FULL]
    if adapters.empty:
        return None
    gain = base["perplexity"] - full["perplexity"]
    table = pd.DataFrame(
        {
            "run_id": adapters["run_id"],
            "method": adapters["method"],
            **measured(adapters, "perplexity", "accuracy"),
            # Quantized runs are measured against the unquantized base: their quantization cost counts.
            "share_of_full_pct": 100 * (base["perplexity"] - adapters["perplexity"]) / gain
            if gain > 0
            else float("nan"),
            "memory_vs_full_pct": 100 * adapters["peak_memory_gb"] / full["peak_memory_gb"],
            "time_vs_full_pct": 100 * adapters["train_wall_s"] / full["train_wall_s"],
            "status": status_column(adapters),
        }
    )
    accuracy_gain = full.get("accuracy", float("nan")) - base.get("accuracy", float("nan"))
    if "accuracy" in adapters and pd.notna(accuracy_gain) and accuracy_gain > 0:
        position = table.columns.get_loc("share_of_full_pct") + 1
        table.insert(
            position, "accuracy_share_of_full_pct", 100 * (adapters["accuracy"] - base["accuracy"]) / accuracy_gain
        )
    table = table[with_accuracy(list(table.columns), table)]
    table.loc[~adapters["fits"].to_numpy(), ["share_of_full_pct", "memory_vs_full_pct", "time_vs_full_pct"]] = float(
        "nan"
    )
    table.attrs.update(full_id=full["run_id"], base_id=base["run_id"], full_perplexity=full["perplexity"],
                       base_perplexity=base["perplexity"])  # fmt: skip
    return table.sort_values("share_of_full_pct", ascending=False, na_position="last").reset_index(drop=True)


def full_share_finding(
    runs: pd.DataFrame, table: pd.DataFrame | None, judge: Judge, settings: FindingSettings
) -> str | None:
    reference = full_reference(runs)
    if reference is None:
        return None
    full, base = reference
    start = (
        f"Full fine-tuning ({full['run_id']}, learning rate {full['training.learning_rate']:g}) moves perplexity from "
        f"{sig(base['perplexity'])} ({base['run_id']}) to {sig(full['perplexity'])}"
    )
    if base["perplexity"] <= full["perplexity"]:
        return f"{start}: no improvement, so no run's share of it is defined."
    if table is None or table["share_of_full_pct"].isna().all():
        return f"{start}."
    best = table.dropna(subset=["share_of_full_pct"]).iloc[0]
    row = runs.set_index("run_id").loc[best["run_id"]]
    # The top adapter was picked from k of them: simultaneous over the k comparisons with full fine-tuning.
    adapters = int(table["share_of_full_pct"].notna().sum())
    comparison = judge.compare(best["run_id"], full["run_id"], "perplexity", settings.sweet_spot_tolerance, adapters)
    verdict = f"; against full fine-tuning it is {comparison.describe()}" if comparison else ""
    return (
        f"{start}. The adapter run recovering most of that improvement, {best['run_id']}, recovers "
        f"{best['share_of_full_pct']:.0f}% of it (perplexity {sig(best['perplexity'])}) at "
        f"{best['memory_vs_full_pct']:.0f}% of full fine-tuning's peak memory and {best['time_vs_full_pct']:.0f}% "
        f"of its training time, training {100 * row['trainable_params'] / full['trainable_params']:.2g}% as many "
        f"parameters{verdict}."
    )


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return {"full_finetuning": full_share_table(study.runs)}


def findings(study: Study) -> list[str | None]:
    return [full_share_finding(study.runs, study.tables.get("full_finetuning"), study.judge, study.settings)]


QUESTION = Question(
    anchor="full-finetuning",
    title="Share of full fine-tuning's improvement (against the unquantized base model)",
    tables=tables,
    findings=findings,
    definitions={
        "share_of_full": "(perplexity of the unquantized base model - perplexity of the run) / (perplexity of the "
        "unquantized base - perplexity of the best full fine-tuning run): the share of full fine-tuning's improvement "
        "a run recovers (accuracy: the same with accuracy gains); a quantized run's quantization cost counts against "
        "it. memory_vs_full, time_vs_full: peak memory and training time over full fine-tuning's. The 90% claim is "
        "tested one-sided against full fine-tuning at the perplexity change a 90% share allows.",
    },
)
