"""Adapter anatomy: how much of its rank each update uses, and which layers the adapters reached."""

from __future__ import annotations

import altair as alt
import pandas as pd

from lora_study.analysis.runs import (
    trained_runs,
)
from lora_study.questions.common import (
    partial_coverage,
)
from lora_study.report.question import Question, Study
from lora_study.report.style import HEIGHT, WIDTH, Style, rank_axis
from lora_study.study.methods import ENERGY_SHARE, FULL

# Utilisation = effective rank (methods.ENERGY_SHARE) / adapter rank, labelled for the report.
SATURATED_AT = 0.75


OVERSIZED_AT = 0.25


def usage_label(utilisation: float) -> str:
    """'saturated' (the adapter may want more rank), 'oversized', 'partly used', 'beyond rank' (the update is not
    confined to r directions), or '' (no adapter rank)."""
    if pd.isna(utilisation):
        return ""
    if utilisation > 1:
        return "beyond rank"  # DoRA's magnitudes, a converted PiSSA/OLoRA adapter (rank 2r)
    if utilisation >= SATURATED_AT:
        return "saturated"
    if utilisation <= OVERSIZED_AT:
        return "oversized"
    return "partly used"


def anatomy_table(runs: pd.DataFrame, layers: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per trained run and module group: effective rank of the updates against the adapter's rank."""
    if layers is not None and "oom" in layers:  # a run whose anatomy did not fit: no layers (oom_finding says so)
        layers = layers[layers["oom"].isna()]
    if layers is None or layers.empty:
        return None
    info = trained_runs(runs).set_index("run_id")
    # With seeds the findings read one row per configuration: its replicates' layers are pooled.
    if "config_id" in layers:
        layers = layers.assign(run_id=layers["config_id"].fillna(layers["run_id"]))
    layers = layers[layers["run_id"].isin(info.index)]
    if layers.empty:
        return None
    grouped = layers.groupby(["run_id", "group"], sort=False)
    table = grouped.agg(
        layers=("layer", "count"),
        effective_rank=("effective_rank", "mean"),
        effective_rank_max=("effective_rank", "max"),
        update_norm=("norm", "mean"),
        top_energy_share=("top_energy_share", "mean"),
    ).reset_index()
    table.insert(1, "method", [info.loc[r, "method"] for r in table["run_id"]])
    ranks = [info.loc[r, "rank"] if info.loc[r, "method"] != FULL else float("nan") for r in table["run_id"]]
    table.insert(2, "rank", ranks)
    table["utilisation"] = table["effective_rank"] / table["rank"]
    table["rank_use"] = [usage_label(u) for u in table["utilisation"]]
    order = {run_id: index for index, run_id in enumerate(info.index)}
    return table.sort_values("run_id", key=lambda ids: ids.map(order), kind="stable").reset_index(drop=True)


def anatomy_finding(tables: dict[str, pd.DataFrame]) -> str | None:
    """Rank usage along the rank sweep: the weight-based answer to 'which rank'."""
    anatomy, ranks = tables.get("anatomy"), tables.get("rank")
    if anatomy is None or ranks is None:
        return None
    per_run = anatomy.groupby("run_id").agg(effective_rank=("effective_rank", "mean"), rank=("rank", "first"))
    swept = per_run.loc[[r for r in ranks["run_id"] if r in per_run.index]].sort_values("rank")
    if len(swept) < 2:
        return None
    parts = [
        f"rank {int(row['rank'])} uses {row['effective_rank']:.1f} ({usage_label(row['effective_rank'] / row['rank'])})"
        for _, row in swept.iterrows()
    ]
    largest = swept.iloc[-1]
    return (
        f"Rank usage (effective rank: the fewest directions holding {ENERGY_SHARE:.0%} of each layer's update "
        f"energy, mean over layers): {'; '.join(parts)}. Given rank {int(largest['rank'])}, the updates need about "
        f"{largest['effective_rank']:.0f} directions: the weight-based answer beside the perplexity-based sweet "
        f"spot (saturated: at least {SATURATED_AT:.0%} of the rank used; oversized: at most {OVERSIZED_AT:.0%})."
    )


def coverage_finding(runs: pd.DataFrame) -> str | None:
    """Runs whose requested groups reached only some decoder layers (a hybrid model's attention layers), so the
    modules axis is read for what it trained, not for what it was called."""
    if "target_layers" not in runs:
        return None
    partial = [f"{run_id} ({'; '.join(parts)})"
               for run_id, text in zip(runs["run_id"], runs["target_layers"].fillna(""), strict=True)
               if (parts := partial_coverage(text))]  # fmt: skip
    if not partial:
        return None
    return "Only part of the model adapted, by design of its layers: " + ", ".join(partial) + "."


def effective_rank_chart(tables: dict[str, pd.DataFrame], style: Style) -> alt.Chart | None:
    """Effective rank per module group against the adapter's rank, with the line where all of it is used."""
    anatomy = tables.get("anatomy")
    if anatomy is None:
        return None
    adapters = anatomy.dropna(subset=["rank"])
    if adapters["rank"].nunique() < 2:
        return None
    frame = style.with_runs(adapters)
    axis = rank_axis(frame["rank"], title="adapter rank (log scale)")
    points = (
        alt.Chart()
        .mark_point(filled=True, size=60, opacity=1)
        .encode(
            x=axis,
            y=alt.Y("effective_rank:Q", title="effective rank (90% energy)"),
            color=style.colour(frame),
            shape=style.shape(frame),
            tooltip=[*style.tooltip(frame), "group:N", alt.Tooltip("effective_rank:Q", format=".3g"), "rank_use:Q"],
        )
    )
    full_use = alt.Chart().mark_line(strokeDash=[4, 4], color="gray").encode(x=axis, y="rank:Q")
    return (
        alt.layer(full_use, points, data=frame)
        .properties(width=WIDTH * 0.5, height=HEIGHT)
        .facet(column=alt.Column("group:N", title="module group"))
        .properties(title="Rank used by the updates, per module group")
    )


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return {"anatomy": anatomy_table(study.runs, study.anatomy)}


def findings(study: Study) -> list[str | None]:
    return [anatomy_finding(study.tables), coverage_finding(study.runs)]


def charts(study: Study, style: Style) -> dict[str, alt.Chart | None]:
    return {"effective_rank": effective_rank_chart(study.tables, style)}


QUESTION = Question(
    anchor="anatomy",
    title="Adapter anatomy",
    tables=tables,
    findings=findings,
    charts=charts,
    captions={
        "effective_rank": "Effective rank (90 % of the update's energy) per module group against the adapter's rank; "
        "the dashed line is full use.",
    },
    titles={
        "anatomy": "Adapter anatomy: effective rank of each update per module group",
    },
    definitions={
        "effective_rank": "per layer, the update is the merged weight minus the base weight, in fp32 on the base "
        "weight the run trained against (bitsandbytes weights dequantized; PiSSA/OLoRA adapters converted for the "
        "original base); full fine-tuning: trained minus base weight. Its effective rank is the fewest singular "
        "directions holding 90% of its energy (squared singular values). Utilisation = effective rank / adapter "
        "rank: saturated at >= 75% (the adapter may want more rank), oversized at <= 25%; above 100% (DoRA's "
        "rescaled magnitudes, PiSSA/OLoRA saved converted at rank 2r) the update is not confined to r directions.",
    },
)
