"""Target modules: what adding the MLP (or other module groups) buys over attention only."""

from __future__ import annotations

import altair as alt
import pandas as pd

from lora_study.analysis.runs import (
    with_own_intervals,
)
from lora_study.questions.common import (
    add_noise,
    measured,
    partial_coverage,
    sig,
    status_column,
    sweep_slice,
    unjudged,
    with_accuracy,
)
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.report.style import HEIGHT, WIDTH, Style, metric_points
from lora_study.stats.verdicts import (
    Judge,
    Verdict,
)


def _any_partial(runs: pd.DataFrame) -> bool:
    return "target_layers" in runs and any(partial_coverage(text) for text in runs["target_layers"].fillna(""))


def module_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    group = sweep_slice(runs, "modules_label", ["rank", "alpha", "quant_label"])
    if group is None:
        return None
    group = group.sort_values("trainable_params")
    table = pd.DataFrame(
        {
            "run_id": group["run_id"],
            "modules": group["modules_label"],
            # How many decoder layers each group reached, where a group reached only some (a hybrid's attention).
            **({"layers_reached": group["target_layers"]} if _any_partial(group) else {}),
            "rank": group["rank"],
            "quantization": group["quant_label"],
            **measured(group, "perplexity", "accuracy"),
            "trainable_params": group["trainable_params"].astype("Int64"),
            **measured(group, "peak_memory_gb"),
            "status": status_column(group),
        }
    )
    table = add_noise(table, group)
    return table[with_accuracy(list(table.columns), table)].reset_index(drop=True)


def attention_finding(modules: pd.DataFrame | None, judge: Judge, settings: FindingSettings) -> str | None:
    """Best module set with the MLP against the best attention-only set, at tolerance min_relative_gain."""
    if modules is None:
        return None
    fitting = modules.dropna(subset=["perplexity"])
    with_mlp = fitting[fitting["modules"].str.contains("mlp|all", regex=True)]
    attention = fitting[~fitting.index.isin(with_mlp.index)]
    if with_mlp.empty or attention.empty:
        return None
    best_attention = attention.loc[attention["perplexity"].idxmin()]
    best_mlp = with_mlp.loc[with_mlp["perplexity"].idxmin()]
    params_ratio = best_mlp["trainable_params"] / best_attention["trainable_params"]
    # Picking the best of each side considered every pair: correct for all of them.
    result = judge.compare(best_mlp["run_id"], best_attention["run_id"], "perplexity", settings.min_relative_gain,
                           len(attention) * len(with_mlp))  # fmt: skip
    if result is None:
        return unjudged("Target modules")
    conclusion = {
        Verdict.EQUIVALENT: "attention-only targeting is enough here",
        Verdict.BETTER: "the MLP layers add quality that attention-only targeting misses",
        Verdict.WORSE: "adding the MLP layers makes it worse",
        Verdict.INCONCLUSIVE: "inconclusive whether the MLP layers are worth adding",
    }[result.verdict]
    return (
        f"Target modules: {conclusion}. Adding the MLP ({best_mlp['modules']}, perplexity "
        f"{sig(best_mlp['perplexity'])}) against the best attention-only set ({best_attention['modules']}, "
        f"{sig(best_attention['perplexity'])}) for {params_ratio:.1f}x the trainable parameters: {result.describe()}."
    )


def perplexity_by_modules(tables: dict[str, pd.DataFrame], style: Style) -> alt.Chart | None:
    modules = tables.get("modules")
    if modules is None:
        return None
    frame = style.with_runs(modules)
    order = list(modules["modules"])
    x = alt.X("modules:N", sort=order, title="target modules", axis=alt.Axis(labelAngle=0))
    quality = metric_points(frame, x, "perplexity", style).properties(
        width=WIDTH * 0.75, height=HEIGHT, title="Perplexity by target modules"
    )
    params = (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=x,
            y=alt.Y("trainable_params:Q", title="trainable parameters"),
            color=style.colour(frame),
            tooltip=style.tooltip(frame),
        )
        .properties(width=WIDTH * 0.75, height=HEIGHT, title="Trainable parameters by target modules")
    )
    return alt.hconcat(quality, params)


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    modules = module_table(study.runs)
    return {"modules": with_own_intervals(modules, study.judge) if modules is not None else None}


def findings(study: Study) -> list[str | None]:
    return [attention_finding(study.tables.get("modules"), study.judge, study.settings)]


def charts(study: Study, style: Style) -> dict[str, alt.Chart | None]:
    return {"perplexity_by_modules": perplexity_by_modules(study.tables, style)}


QUESTION = Question(
    anchor="modules",
    title="Target modules",
    tables=tables,
    findings=findings,
    charts=charts,
    captions={
        "perplexity_by_modules": "Perplexity per target-module set (95 % intervals) beside the trainable parameters "
        "each set adds.",
    },
)
