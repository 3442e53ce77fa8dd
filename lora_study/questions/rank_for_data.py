"""How much rank the data needs: per training-set size (training.train_examples swept with rank), the smallest
rank equivalent to the best rank at that size, and whether that rank grows with the data."""

from __future__ import annotations

import itertools

import pandas as pd

from lora_study.questions.training_axes import MATRIX_PREFIX
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.stats.verdicts import Judge, Verdict, against_best

MATRIX = f"{MATRIX_PREFIX}rank__train_examples"


def rank_for_data_table(tables: dict[str, pd.DataFrame], judge: Judge, settings: FindingSettings
                        ) -> pd.DataFrame | None:  # fmt: skip
    """Per data size: the best rank (lowest perplexity), the smallest rank judged equivalent to it (tolerance
    sweet_spot_tolerance; m = every pair of ranks within every size: each size's best is picked from its ranks),
    and the smaller ranks left inconclusive. Without an equivalent smaller rank the best rank is the one needed."""
    matrix = tables.get(MATRIX)
    if matrix is None:
        return None
    cells = matrix.attrs["cells"].dropna(subset=["perplexity"])
    sizes = sorted(cells["train_examples"].unique())
    if len(sizes) < 2:
        return None
    m = sum(against_best(k) for k in cells.groupby("train_examples").size())
    rows = []
    for size in sizes:
        at_size = cells[cells["train_examples"] == size].sort_values("rank")
        best = at_size.loc[at_size["perplexity"].idxmin()]
        needed, verdict, undecided = best, "is the best", []
        for _, smaller in at_size[at_size["rank"] < best["rank"]].iterrows():
            result = judge.compare(smaller["run_id"], best["run_id"], "perplexity", settings.sweet_spot_tolerance, m)
            if result is not None and result.verdict is Verdict.EQUIVALENT:
                needed, verdict = smaller, result.describe()
                break
            if result is None or result.verdict is Verdict.INCONCLUSIVE:
                undecided.append(int(smaller["rank"]))
        rows.append({"train_examples": int(size), "ranks": len(at_size), "largest_rank": int(at_size["rank"].max()),
                     "best_rank": int(best["rank"]),
                     "best_perplexity": best["perplexity"], "rank_needed": int(needed["rank"]),
                     "needed_run_id": needed["run_id"], "vs_best": verdict,
                     "smaller_inconclusive": ", ".join(map(str, undecided))})  # fmt: skip
    return pd.DataFrame(rows)


def rank_for_data_finding(table: pd.DataFrame | None, settings: FindingSettings) -> str | None:
    """Per size the rank needed, then whether it grows with the data: it grows when the needed ranks never fall
    and the largest size needs more than the smallest; it does not grow when they are all equal."""
    if table is None or table.empty:
        return None
    listed = "; ".join(
        f"{r['train_examples']} examples: rank {r['rank_needed']}"
        + (f" (best rank {r['best_rank']}; {r['vs_best']})" if r["rank_needed"] != r["best_rank"] else " (the best)")
        + (f", smaller ranks {r['smaller_inconclusive']} inconclusive" if r["smaller_inconclusive"] else "")
        for _, r in table.iterrows()
    )
    needed = list(table["rank_needed"])
    if len(set(needed)) == 1:
        trend = f"the rank needed does not grow with the data (rank {needed[0]} at every size)"
    elif all(a <= b for a, b in itertools.pairwise(needed)):
        trend = f"the rank needed grows with the data, from {needed[0]} to {needed[-1]}"
    else:
        trend = "the rank needed does not grow steadily with the data"
    at_top = table[table["rank_needed"] == table["largest_rank"]]
    if len(at_top):
        trend += (f" (at {', '.join(str(n) for n in at_top['train_examples'])} examples the rank needed is the "
                  "largest swept: it may be higher)")  # fmt: skip
    if table["smaller_inconclusive"].astype(bool).any():
        trend += " (where a smaller rank is inconclusive, the rank needed may be lower: more seeds would settle it)"
    return (f"Rank needed per training-set size (the smallest rank equivalent to the best at that size, tolerance "
            f"{settings.sweet_spot_tolerance:.0%}): {listed}. So {trend}.")  # fmt: skip


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return {"rank_for_data": rank_for_data_table(study.tables, study.judge, study.settings)}


def findings(study: Study) -> list[str | None]:
    return [rank_for_data_finding(study.tables.get("rank_for_data"), study.settings)]


QUESTION = Question(
    anchor="rank-for-data",
    title="How much rank the data needs",
    tables=tables,
    findings=findings,
    titles={"rank_for_data": "Rank needed per training-set size"},
    definitions={
        "rank_needed": "per training-set size (training.train_examples), the smallest rank whose perplexity is "
        "*equivalent* to the best rank's at that size (tolerance sweet_spot_tolerance; m = every pair of ranks "
        "within every size), else the best rank. It grows with the data when the sizes' needed ranks never fall "
        "and the largest exceeds the smallest.",
    },
)
