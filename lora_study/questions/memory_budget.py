"""Which configuration for my GPU: the cheapest run equivalent to the best that fits each budget."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from lora_study.analysis.runs import (
    trained_runs,
)
from lora_study.questions.common import (
    sig,
    with_accuracy,
)
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.stats.verdicts import (
    Judge,
    Verdict,
    against_best,
)
from lora_study.study.budget import GPU_COUNTS, gpus_needed, per_gpu_column


def decision_table(
    runs: pd.DataFrame, budgets_gb: tuple[float, ...], judge: Judge, settings: FindingSettings
) -> pd.DataFrame | None:
    """Per memory budget (per GPU): the cheapest fitting run equivalent to the best fitting run, and the GPUs it
    needs.

    Cheapest = fewest GPUs, then least peak memory per GPU, then least
    training time. The best is the lowest mean perplexity among the runs that
    fit; each cheaper run is compared with it at tolerance sweet_spot_tolerance
    (m = every pair of the k runs that fit: the best was picked from them). A
    CPU study adds the same table on the planner's predicted GPU memory,
    labelled as predicted: there a run fits a budget on the fewest of 1, 2, 4
    or 8 GPUs whose predicted peak per GPU is within it (a sharded run,
    training.gpus).
    """
    trained = trained_runs(runs)
    if trained.empty:
        return None
    fitting = trained[trained["fits"]].dropna(subset=["perplexity", "peak_memory_gb"])
    bases = [("measured", "peak_memory_gb")]
    measured_on_cpu = not trained["memory_kind"].fillna("").str.startswith("cuda").any()
    if measured_on_cpu and "plan_predicted_cuda_gb" in fitting and fitting["plan_predicted_cuda_gb"].notna().any():
        bases.append(("predicted GPU", "plan_predicted_cuda_gb"))
    rows = []
    for basis, column in bases:
        for budget in budgets_gb:
            candidates = _within_budget(fitting, basis, column, budget)
            rows.append({"memory": basis, "budget_gb": budget,
                         **_cheapest_equivalent(candidates, judge, settings)})  # fmt: skip
    table = pd.DataFrame(rows)
    return table[with_accuracy(list(table.columns), table)]


def _within_budget(fitting: pd.DataFrame, basis: str, column: str, budget: float) -> pd.DataFrame:
    """The runs that fit `budget` per GPU, with the GPUs they need (gpus_needed) and their memory per GPU
    (memory_gb): measured, as each run was laid out; predicted, on the fewest GPUs that fit."""
    if basis == "measured":
        gpus = pd.to_numeric(fitting["gpus"], errors="coerce") if "gpus" in fitting else pd.Series(1, fitting.index)
        candidates = fitting.assign(gpus_needed=gpus.fillna(1).astype(int),
                                    memory_gb=pd.to_numeric(fitting[column], errors="coerce"))  # fmt: skip
        return candidates[candidates["memory_gb"] <= budget]
    needed = [_predicted_gpus(row, column, budget) for _, row in fitting.iterrows()]
    candidates = fitting.assign(gpus_needed=[n for n, _ in needed], memory_gb=[gb for _, gb in needed])
    return candidates.dropna(subset=["gpus_needed"]).astype({"gpus_needed": int})


def _predicted_gpus(row: pd.Series, column: str, budget: float) -> tuple[float, float]:
    """(fewest GPUs, predicted GB per GPU on them) for one run under `budget`; NaNs when none fits. Runs planned
    before the per-GPU predictions existed have their one-device prediction only."""
    predictions = {per_gpu_column("cuda", gpus): row.get(f"plan_{per_gpu_column('cuda', gpus)}")
                   for gpus in GPU_COUNTS}  # fmt: skip
    if all(pd.isna(value) for value in predictions.values()):
        predictions[per_gpu_column("cuda", 1)] = row.get(column)
    gpus = gpus_needed(predictions, "cuda", budget)
    return (math.nan, math.nan) if gpus is None else (gpus, float(predictions[per_gpu_column("cuda", gpus)]))


def _cheapest_equivalent(candidates: pd.DataFrame, judge: Judge, settings: FindingSettings) -> dict[str, Any]:
    if candidates.empty:
        return {"run_id": "nothing fits"}
    cost = ["gpus_needed", "memory_gb", "train_wall_s"]
    best = candidates.sort_values(["perplexity", "gpus_needed", "memory_gb"]).iloc[0]
    cheaper = candidates.sort_values(cost)
    cheaper = cheaper[cheaper["run_id"] != best["run_id"]]
    cheaper = cheaper[
        (cheaper["gpus_needed"] < best["gpus_needed"])
        | ((cheaper["gpus_needed"] == best["gpus_needed"]) & (cheaper["memory_gb"] <= float(best["memory_gb"])))
    ]
    pick, comparison, undecided = best, None, []
    for _, row in cheaper.iterrows():
        result = judge.compare(row["run_id"], best["run_id"], "perplexity", settings.sweet_spot_tolerance,
                               against_best(len(candidates)))  # fmt: skip
        if result is not None and result.verdict is Verdict.EQUIVALENT:
            pick, comparison = row, result
            break
        if result is None or result.verdict is Verdict.INCONCLUSIVE:
            undecided.append(row["run_id"])
    return {
        "run_id": pick["run_id"],
        "gpus_needed": int(pick["gpus_needed"]),
        "perplexity": pick["perplexity"],
        "accuracy": pick.get("accuracy"),
        "memory_gb": pick["memory_gb"],
        "train_wall_s": pick["train_wall_s"],
        "best_run_id": best["run_id"],
        "vs_best": comparison.describe() if comparison else "is the best",
        "cheaper_inconclusive": ", ".join(undecided),
    }


def decision_findings(decisions: pd.DataFrame | None, memory_text: str) -> list[str]:
    """One sentence per distinct recommendation; consecutive budgets with the same pick share it."""
    if decisions is None:
        return []
    sentences = []
    for basis, group in decisions.groupby("memory", sort=False):
        rows = list(group.to_dict("records"))
        label = memory_text if basis == "measured" else "predicted GPU memory (planner)"
        start = 0
        for end in range(len(rows)):
            same = ("run_id", "best_run_id", "gpus_needed")  # one sentence while the pick and its reason stay
            if end + 1 < len(rows) and all(rows[end + 1].get(k) == rows[start].get(k) for k in same):
                continue
            first, last, row = rows[start]["budget_gb"], rows[end]["budget_gb"], rows[start]
            budget = f"Budget {first:g} GB" if first == last else f"Budgets {first:g}-{last:g} GB"
            if basis != "measured":
                budget += " (predicted GPU memory)"
            if row["run_id"] == "nothing fits":
                sentences.append(f"{budget}: nothing fits.")
            else:
                gpus = int(row.get("gpus_needed") or 1)
                on = f" on {gpus} GPUs" if gpus > 1 else ""
                per_gpu = " per GPU" if gpus > 1 else ""
                choice = (f"{row['run_id']}{on} (perplexity {sig(row['perplexity'])}, {row['memory_gb']:.2f} GB"
                          f"{per_gpu} {label})")  # fmt: skip
                best = row["best_run_id"]
                why = ("the best that fits" if row["run_id"] == best
                       else f"the cheapest run equivalent to the best that fits, {best}: {row['vs_best']}")  # fmt: skip
                undecided = (f"; cheaper {row['cheaper_inconclusive']} inconclusive against it"
                             if row.get("cheaper_inconclusive") else "")  # fmt: skip
                sentences.append(f"{budget}: {choice}, {why}{undecided}.")
            start = end + 1
    return sentences


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return {"decision": decision_table(study.runs, study.settings.memory_budgets_gb, study.judge, study.settings)}


def findings(study: Study) -> list[str | None]:
    return decision_findings(study.tables.get("decision"), study.memory_short)


QUESTION = Question(
    anchor="budget",
    title="Which configuration for my memory budget",
    tables=tables,
    findings=findings,
    definitions={
        "decision": "for each memory budget, among the runs whose peak memory is at most the budget: the best is "
        "the lowest mean perplexity; the pick is the cheapest run (least memory, then least training time) that is "
        "*equivalent* to the best (tolerance sweet_spot_tolerance), else the best itself; cheaper runs whose "
        "comparison was inconclusive are named. m = k(k-1)/2 over the k runs within the budget (the best is "
        "picked from them). Memory is per GPU; gpus_needed is the GPUs the pick trains on (cheapest: fewest GPUs "
        "first). When memory was measured on a CPU, the same table is also given on the planner's predicted GPU "
        "memory, labelled as predicted: a run fits there on the fewest of 1, 2, 4 or 8 GPUs whose predicted peak "
        "per GPU is within the budget (sharded with FSDP2, training.gpus).",
    },
)
