"""Every verdict the report rests on: each change against its reference, with its interval."""

from __future__ import annotations

import altair as alt
import pandas as pd

from lora_study.report.question import Question, Study
from lora_study.report.style import HEIGHT, WIDTH, Style
from lora_study.stats.verdicts import (
    comparisons_table,
)

VERDICT_COLOURS = {"better": "#54a24b", "worse": "#e45756", "equivalent": "#4c78a8", "inconclusive": "#999999"}


def comparison_chart(tables: dict[str, pd.DataFrame]) -> alt.Chart | None:
    """Each perplexity verdict's change against its reference with the interval it rests on, over the
    tolerance band of its sentence: what the verdicts say, beside the per-configuration error bars."""
    comparisons = tables.get("comparisons")
    if comparisons is None or comparisons.empty:
        return None
    frame = comparisons[comparisons["metric"] == "perplexity"].copy()
    if frame.empty:
        return None
    frame["pair"] = frame["candidate"] + " vs " + frame["reference"]
    frame = frame.drop_duplicates("pair")  # the first sentence's comparison of a pair
    frame["tolerance_low"] = -frame["tolerance_pct"]
    order = list(frame["pair"])
    y = alt.Y("pair:N", title="candidate vs reference", sort=order)
    x_title = "perplexity change against the reference (%), interval the verdict rests on"
    band = alt.Chart(frame).mark_bar(color="#dddddd", height=12).encode(
        x=alt.X("tolerance_low:Q", title=x_title), x2="tolerance_pct:Q", y=y)  # fmt: skip
    zero = alt.Chart(pd.DataFrame({"x": [0.0]})).mark_rule(color="#666666", strokeDash=[4, 3]).encode(x="x:Q")
    colour = alt.Color("verdict:N", scale=alt.Scale(domain=list(VERDICT_COLOURS), range=list(VERDICT_COLOURS.values())))
    tooltip = [alt.Tooltip("candidate:N"), alt.Tooltip("reference:N"), alt.Tooltip("verdict:N"),
               alt.Tooltip("change_pct:Q", title="change (%)", format="+.1f"),
               alt.Tooltip("low_pct:Q", title="low (%)", format="+.1f"),
               alt.Tooltip("high_pct:Q", title="high (%)", format="+.1f"),
               alt.Tooltip("tolerance_pct:Q", title="tolerance (%)", format=".0f"),
               alt.Tooltip("comparisons:Q", title="comparisons (m)"), alt.Tooltip("noise:N")]  # fmt: skip
    rules = alt.Chart(frame).mark_rule(strokeWidth=2).encode(x="low_pct:Q", x2="high_pct:Q", y=y, color=colour)
    points = alt.Chart(frame).mark_point(filled=True, size=60).encode(x="change_pct:Q", y=y, color=colour,
                                                                      tooltip=tooltip)  # fmt: skip
    height = max(HEIGHT // 2, 18 * len(frame))
    return alt.layer(band, zero, rules, points).properties(width=WIDTH, height=height,
                                                           title="Verdicts: change against the reference")  # fmt: skip


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return {"comparisons": comparisons_table(study.judge) if study.judge.records else None}


def charts(study: Study, style: Style) -> dict[str, alt.Chart | None]:
    return {"comparisons": comparison_chart(study.tables)}


QUESTION = Question(
    anchor="verdicts",
    title="Every verdict against its reference",
    tables=tables,
    charts=charts,
    captions={
        "comparisons": "Each verdict's perplexity change against its reference with the interval the verdict rests "
        "on, over the grey tolerance band of its sentence. These intervals are paired (same rows, shared seeds) and "
        "so much narrower than two configurations' own error bars, which each carry the noise both share: bars that "
        "overlap can still differ.",
    },
    titles={
        "comparisons": "Every verdict: the change against its reference and the interval it rests on",
    },
    answered_last=True,
)
