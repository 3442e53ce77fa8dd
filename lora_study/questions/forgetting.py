"""Learning vs forgetting: what each run gains on the study's data against what it loses on general text it was
not trained on (evaluation.forgetting), each against its base model in its own weight format."""

from __future__ import annotations

import altair as alt
import pandas as pd

from lora_study.analysis.runs import baseline_ids, baselines, trained_runs
from lora_study.questions.pareto import pareto_front
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.report.style import HEIGHT, WIDTH, Style
from lora_study.stats.verdicts import GENERAL, Judge, Verdict
from lora_study.study.methods import FULL


def forgetting_table(runs: pd.DataFrame, judge: Judge, settings: FindingSettings) -> pd.DataFrame | None:
    """Per fitting trained run: its perplexity change on the study's data (learning, negative is better) and on
    the general text (forgetting, positive is worse) against its base model; the paired verdict on the general
    text at tolerance sweet_spot_tolerance (m = the runs judged); whether it is on the Pareto set of the two."""
    if "general_perplexity" not in runs or runs["general_perplexity"].isna().all():
        return None
    base = baselines(runs)
    base_general = dict(zip(base["run_id"], base["general_perplexity"].where(base["fits"]), strict=True))
    trained = trained_runs(runs)
    trained = trained[trained["fits"]].dropna(subset=["perplexity", "general_perplexity"])
    trained = trained.assign(base_id=baseline_ids(trained))
    trained = trained.assign(base_general=trained["base_id"].map(base_general)).dropna(subset=["base_general"])
    if trained.empty:
        return None
    comparisons = len(trained)
    verdicts = [judge.compare(row["run_id"], row["base_id"], GENERAL, settings.sweet_spot_tolerance, comparisons)
                for _, row in trained.iterrows()]  # fmt: skip
    table = pd.DataFrame({
        "run_id": trained["run_id"], "method": trained["method"], "base_id": trained["base_id"],
        "perplexity": trained["perplexity"],
        "learning_pct": 100 * (trained["perplexity"] / trained["base_perplexity"] - 1),
        "general_perplexity": trained["general_perplexity"],
        "forgetting_pct": 100 * (trained["general_perplexity"] / trained["base_general"] - 1),
        "forgets": [v.verdict.value if v else "not judged" for v in verdicts],
        "vs_base_general": [v.describe() if v else "not judged (no per-row scores)" for v in verdicts],
    })  # fmt: skip
    front = set(pareto_front(table, "learning_pct", "forgetting_pct")["run_id"])
    return table.assign(pareto=table["run_id"].isin(front)).reset_index(drop=True)


# What a verdict on general-text perplexity against the base says about forgetting.
FORGETS = {Verdict.WORSE.value: "forget", Verdict.EQUIVALENT.value: "do not forget",
           Verdict.BETTER.value: "improve on general text", Verdict.INCONCLUSIVE.value: "inconclusive"}  # fmt: skip


def forgetting_finding(table: pd.DataFrame | None, settings: FindingSettings) -> str | None:
    """One sentence: how many runs forget, the trade-off's Pareto set, and full fine-tuning's place on it."""
    if table is None or table.empty:
        return None
    counts = table["forgets"].map(FORGETS).fillna("not judged").value_counts()
    tally = ", ".join(f"{count} {label}" for label, count in counts.items())
    front = table[table["pareto"]].sort_values("learning_pct")
    listed = "; ".join(f"{r['run_id']} ({r['learning_pct']:+.1f}% perplexity on the study's data, "
                       f"{r['forgetting_pct']:+.1f}% on general text)" for _, r in front.iterrows())  # fmt: skip
    most = table.loc[table["forgetting_pct"].idxmax()]
    sentence = (f"Learning vs forgetting (general-text perplexity against each run's base model, tolerance "
                f"{settings.sweet_spot_tolerance:.0%}, {len(table)} runs): {tally}. Most forgetting: {most['run_id']}, "
                f"{most['vs_base_general']}. Pareto set of the trade-off: {listed}.")  # fmt: skip
    full = table[table["method"] == FULL]
    if not full.empty:
        listed = ", ".join(f"{r['run_id']} ({r['learning_pct']:+.1f}%, {r['forgetting_pct']:+.1f}%"
                           f"{', on it' if r['pareto'] else ''})" for _, r in full.iterrows())  # fmt: skip
        sentence += f" Full fine-tuning: {listed}."
    return sentence


def learning_vs_forgetting(table: pd.DataFrame | None, style: Style) -> alt.Chart | None:
    if table is None or table.empty:
        return None
    runs = style.with_runs(table)
    x = alt.X("learning_pct:Q", title="perplexity change on the study's data vs base (%; left learns more)")
    y = alt.Y("forgetting_pct:Q", title="perplexity change on general text vs base (%; up forgets more)")
    points = (
        alt.Chart(runs)
        .mark_point(filled=True, size=70, opacity=1)
        .encode(x=x, y=y, color=style.colour(runs), shape=style.shape(runs),
                tooltip=[*style.tooltip(runs), alt.Tooltip("vs_base_general:N", title="vs base, general text")])
    )  # fmt: skip
    front = table[table["pareto"]].sort_values("learning_pct")
    frontier = alt.Chart(front).mark_line(color="black", strokeDash=[4, 3]).encode(x=x, y=y)
    labels = alt.Chart(front).mark_text(align="left", dx=7, dy=-8, fontSize=10).encode(x=x, y=y, text="run_id:N")
    zero = alt.Chart(pd.DataFrame({"zero": [0.0]})).mark_rule(color="#999").encode(y="zero:Q")
    return alt.layer(zero, frontier, points, labels).properties(
        title="Learning vs forgetting (dashed: Pareto set)", width=WIDTH, height=HEIGHT
    )


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return {"forgetting": forgetting_table(study.runs, study.judge, study.settings)}


def findings(study: Study) -> list[str | None]:
    return [forgetting_finding(study.tables.get("forgetting"), study.settings)]


def charts(study: Study, style: Style) -> dict[str, alt.Chart | None]:
    return {"learning_vs_forgetting": learning_vs_forgetting(study.tables.get("forgetting"), style)}


QUESTION = Question(
    anchor="forgetting",
    title="Learning vs forgetting",
    tables=tables,
    findings=findings,
    charts=charts,
    captions={
        "learning_vs_forgetting": "Each run's perplexity change against its base model on the study's data "
        "(learning: left is better) and on general text it was not trained on (forgetting: up is worse); the "
        "dashed line joins the Pareto set of the trade-off.",
    },
    titles={"forgetting": "Learning vs forgetting"},
    definitions={
        "forgetting_pct": "100 x (perplexity on the general text / the base model's there - 1), the base model in "
        "the run's own weight format; the general text is evaluation.forgetting.source (by default English prose "
        "from the Python standard library's help topics), never trained on.",
        "learning_pct": "100 x (validation perplexity / the base model's - 1): negative is learning.",
        "forgets": "the paired verdict on general-text perplexity against the base model (worse = forgets; "
        "equivalent = within sweet_spot_tolerance), m = the runs judged, seed noise included where measured.",
    },
)
