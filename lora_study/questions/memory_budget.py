"""Which configuration for my GPU: the cheapest run equivalent to the best that fits each budget."""

from __future__ import annotations

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


def decision_table(
    runs: pd.DataFrame, budgets_gb: tuple[float, ...], judge: Judge, settings: FindingSettings
) -> pd.DataFrame | None:
    """Per memory budget: the cheapest fitting run equivalent to the best fitting run.

    Cheapest = least peak memory, then least training time. The best is the
    lowest mean perplexity among the runs that fit; each cheaper run is
    compared with it at tolerance sweet_spot_tolerance (m = every pair of the
    k runs that fit: the best was picked from them). A CPU study adds the same table on the planner's
    predicted GPU memory, labelled as predicted.
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
            rows.append({"memory": basis, "budget_gb": budget,
                         **_cheapest_equivalent(fitting, column, budget, judge, settings)})  # fmt: skip
    table = pd.DataFrame(rows)
    return table[with_accuracy(list(table.columns), table)]


def _cheapest_equivalent(
    fitting: pd.DataFrame, column: str, budget: float, judge: Judge, settings: FindingSettings
) -> dict[str, Any]:
    candidates = fitting[pd.to_numeric(fitting[column], errors="coerce") <= budget]
    if candidates.empty:
        return {"run_id": "nothing fits"}
    best = candidates.sort_values(["perplexity", column]).iloc[0]
    cheaper = candidates.sort_values([column, "train_wall_s"])
    cheaper = cheaper[cheaper["run_id"] != best["run_id"]]
    cheaper = cheaper[pd.to_numeric(cheaper[column]) <= float(best[column])]
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
        "perplexity": pick["perplexity"],
        "accuracy": pick.get("accuracy"),
        "memory_gb": pick[column],
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
            same = ("run_id", "best_run_id")  # one sentence while the pick and the reason stay the same
            if end + 1 < len(rows) and all(rows[end + 1].get(k) == rows[start].get(k) for k in same):
                continue
            first, last, row = rows[start]["budget_gb"], rows[end]["budget_gb"], rows[start]
            budget = f"Budget {first:g} GB" if first == last else f"Budgets {first:g}-{last:g} GB"
            if basis != "measured":
                budget += " (predicted GPU memory)"
            if row["run_id"] == "nothing fits":
                sentences.append(f"{budget}: nothing fits.")
            else:
                choice = (f"{row['run_id']} (perplexity {sig(row['perplexity'])}, {row['memory_gb']:.2f} GB "
                          f"{label})")  # fmt: skip
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
        "picked from them). When memory was measured on a CPU, "
        "the same table is also given on the planner's predicted GPU memory, labelled as predicted.",
    },
)
