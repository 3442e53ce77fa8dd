"""Diminishing returns: is each rank step worth it?"""

from __future__ import annotations

import pandas as pd

from lora_study.questions.common import (
    unjudged,
    with_verdicts,
)
from lora_study.questions.rank import rank_table
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.stats.verdicts import (
    Comparison,
    Judge,
    Verdict,
)


def diminishing_returns_table(runs: pd.DataFrame, judge: Judge, settings: FindingSettings) -> pd.DataFrame | None:
    """Each rank step's perplexity change, with its verdict at tolerance min_relative_gain.

    The steps together carry the "returns diminish" sentence: m = the number
    of steps (Bonferroni).
    """
    ranks = rank_table(runs)
    if ranks is None:
        return None
    fitting = ranks.dropna(subset=["perplexity"]).reset_index(drop=True)
    if len(fitting) < 2:
        return None
    before, after = fitting.iloc[:-1].reset_index(drop=True), fitting.iloc[1:].reset_index(drop=True)
    gain = before["perplexity"] - after["perplexity"]
    extra_memory = after["peak_memory_gb"] - before["peak_memory_gb"]
    steps = pd.DataFrame(
        {
            "step": [f"{a} -> {b}" for a, b in zip(before["rank"], after["rank"], strict=True)],
            "from_rank": before["rank"],
            "to_rank": after["rank"],
            "perplexity_change": -gain,
            "perplexity_change_pct": -100 * gain / before["perplexity"],
            "memory_change_gb": extra_memory,
            "time_change_s": after["train_wall_s"] - before["train_wall_s"],
            "marginal_gain_per_gb": (gain / extra_memory).where(extra_memory > 0),
        }
    )
    comparisons = [
        judge.compare(b, a, "perplexity", settings.min_relative_gain, len(steps))
        for a, b in zip(before["run_id"], after["run_id"], strict=True)
    ]
    return with_verdicts(steps, comparisons)


def diminishing_finding(steps: pd.DataFrame | None, settings: FindingSettings) -> str | None:
    """Returns diminish above r when every step above r is shown not worth it and the step into r was."""
    if steps is None:
        return None
    comparisons: list[Comparison | None] = steps.attrs.get("comparisons", [])
    if not comparisons or any(c is None for c in comparisons):
        return unjudged("Diminishing returns")
    verdicts = [c.verdict for c in comparisons]
    listed = "; ".join(f"{s}: {c.interval_text()} {c.verdict.value}" for s, c in zip(steps["step"], comparisons,
                                                                                   strict=True))  # fmt: skip
    counted = f"{len(steps)} steps compared" if len(steps) > 1 else "1 step"

    def rests_on(comparison: Comparison) -> str:
        # The noise sources of the step the conclusion rests on (steps may differ; the table has each).
        return f"tolerance {settings.min_relative_gain:.0%}, {counted}, {comparison.sources}"

    if verdicts[-1] is Verdict.BETTER:
        return (f"Returns had not diminished by the largest rank tried: the step {steps['step'].iloc[-1]} is still "
                f"better ({listed}; {rests_on(comparisons[-1])}).")  # fmt: skip
    worth = [k for k, v in enumerate(verdicts) if v is Verdict.BETTER]
    first_after = (worth[-1] + 1) if worth else 0
    tail = comparisons[first_after:]
    knee = int(steps["from_rank"].iloc[first_after])
    undecided = [c for c in tail if c.verdict is Verdict.INCONCLUSIVE]
    if not undecided:
        return (f"Returns diminish above rank {knee}: every later rank step is shown to change perplexity by less "
                f"than {settings.min_relative_gain:.0%} or to hurt ({listed}; {rests_on(tail[0])}).")  # fmt: skip
    return (f"Diminishing returns: inconclusive above rank {knee} ({listed}; {rests_on(undecided[0])}); "
            f"{undecided[0].settle}.")  # fmt: skip


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return {"diminishing_returns": diminishing_returns_table(study.runs, study.judge, study.settings)}


def findings(study: Study) -> list[str | None]:
    return [diminishing_finding(study.tables.get("diminishing_returns"), study.settings)]


QUESTION = Question(
    anchor="diminishing-returns",
    title="Diminishing returns per rank step",
    tables=tables,
    findings=findings,
    definitions={
        "diminishing": "each rank step is compared with the rank before it at tolerance min_relative_gain = "
        "{min_relative_gain:.0%}: *better* = worth it, *equivalent* = not worth it. Returns diminish above rank r "
        "when every step after r is equivalent or worse and the step into r (if any) is better; m = the number of "
        "steps.",
        "marginal_gain_per_gb": "perplexity reduction of a rank step divided by the extra peak memory it "
        "costs (empty when memory did not grow).",
    },
)
