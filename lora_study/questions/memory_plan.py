"""Where the memory goes: the planner's prediction, term by term, against the measured peak."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import altair as alt
import pandas as pd

from lora_study.analysis.runs import (
    STATUS_LABELS,
    trained_runs,
)
from lora_study.questions.common import (
    status_column,
)
from lora_study.report.question import Question, Study
from lora_study.report.style import WIDTH, Style

log = logging.getLogger("lora_study")


def measured_device(memory_kind: Any) -> str:
    """The device a run's peak memory was measured on ("cuda" or "cpu"), from its memory kind: the
    planner's prediction for that device is the one it is compared with."""
    return "cuda" if str(memory_kind).startswith("cuda") else "cpu"


def memory_plan_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """The planner's prediction beside the measured peak, for the memory kind that was measured.

    CUDA runs compare with the CUDA prediction (NVML's figure); CPU runs with
    the CPU prediction (process RSS).
    """
    trained = trained_runs(runs)
    if trained.empty or "plan_predicted_cuda_gb" not in trained:
        return None
    on_cuda = trained["memory_kind"].map(measured_device).eq("cuda")
    predicted = pd.to_numeric(trained["plan_predicted_cuda_gb"].where(on_cuda, trained["plan_predicted_cpu_gb"]))
    # The planner predicts the training phase: compared with its own peak where the run recorded one.
    whole = trained["peak_memory_gb"]
    phase = pd.to_numeric(trained["train_peak_memory_gb"], errors="coerce") if "train_peak_memory_gb" in trained \
        else pd.Series(float("nan"), index=trained.index)  # fmt: skip
    measured = phase.fillna(whole).where(trained["fits"])
    return pd.DataFrame(
        {
            "run_id": trained["run_id"],
            "memory_kind": trained["memory_kind"],
            "measured_phase": ["training" if pd.notna(v) else "whole job" for v in phase],
            "predicted_gb": predicted,
            "measured_gb": measured,
            "whole_job_gb": whole.where(trained["fits"]),
            "error_pct": 100 * (predicted - measured) / measured,
            "status": status_column(trained),
            "plan_error": trained["plan_error"].fillna("") if "plan_error" in trained else "",
        }
    )


def memory_plan_finding(table: pd.DataFrame | None) -> str | None:
    if table is None:
        return None
    compared = table.dropna(subset=["error_pct"])
    skipped = table[table["status"] == STATUS_LABELS["skipped"]]
    parts = []
    if len(compared):
        errors = compared["error_pct"].abs()
        kinds = ", ".join(sorted(set(compared["memory_kind"])))
        parts.append(
            f"Memory plan vs measured ({kinds}): median error {errors.median():.0f}%, "
            f"largest {errors.max():.0f}% ({compared.loc[errors.idxmax(), 'run_id']})."
        )
    if len(skipped):
        listed = ", ".join(f"{r.run_id} ({r.predicted_gb:.2f} GB predicted)" for r in skipped.itertuples())
        parts.append(f"Skipped by the memory budget: {listed}.")
    unplanned = table[table["plan_error"].astype(str) != ""]
    if len(unplanned):
        listed = ", ".join(unplanned["run_id"])
        parts.append(f"No memory prediction for {listed}: the planner failed on them (see logs/plan.log); "
                     "they trained regardless.")  # fmt: skip
    return " ".join(parts) or None


# Where a run's predicted peak goes, term by term (plan.csv columns), before the device's overhead.
MEMORY_TERMS = {
    "base weights": "weights_gb",
    "LoRA weights": "adapter_weights_gb",
    "gradients + optimizer states": "gradients_optimizer_gb",
    "activations": "activations_gb",
    "backward working memory": "backward_working_gb",
    "logits": "logits_gb",
}


# A sharded run's (training.gpus > 1) share of "base weights" that FSDP gathers whole: the root unit and two layers.
GATHERED_TERM = "gathered layers (sharded)"
GATHERED_COLOUR = "#5c5cb8"

# What each device adds on top of the allocated terms (cpu_overhead_bytes; CUDA_CONTEXT_GB and CUDA_ALLOCATOR_SLACK).
OVERHEAD_TERMS = {"cpu": "runtime + mapped checkpoint + allocator retention", "cuda": "CUDA context + allocator slack"}


def memory_terms(plan: Mapping[str, Any], device_type: str) -> dict[str, float]:
    """A run's predicted peak on `device_type` ("cuda" or "cpu") split into MEMORY_TERMS and the overhead (GB).

    `plan` holds plan.csv's columns (or the runs table's plan_<column>s with the prefix removed).
    """
    terms = {term: float(plan.get(column, math.nan)) for term, column in MEMORY_TERMS.items()}
    gathered = float(plan.get("gathered_gb", 0.0) or 0.0)
    if gathered > 0:  # a sharded run: its shard of the weights, and the layers FSDP holds whole at a time
        terms = {"base weights": terms["base weights"] - gathered, GATHERED_TERM: gathered,
                 **{term: gb for term, gb in terms.items() if term != "base weights"}}  # fmt: skip
    total = float(plan["predicted_cuda_gb" if device_type == "cuda" else "predicted_cpu_gb"])
    terms[OVERHEAD_TERMS[device_type]] = total - float(plan["predicted_cuda_allocated_gb"])
    return terms


# The memory chart's terms get their own palette: its colours mean terms, not formats.
TERM_COLOURS = ("#3b3b98", "#7f7fd5", "#c9a227", "#6a9a58", "#b7d6a3", "#d98c5f", "#bdbdbd")


def memory_breakdown(style: Style) -> alt.Chart | None:
    """Each trained run's predicted peak as stacked planner terms, its measured peak as a black tick (per GPU: a
    sharded run's are its largest rank's)."""
    runs = trained_runs(style.runs)
    plan_columns = [f"plan_{column}" for column in MEMORY_TERMS.values()]
    if any(column not in runs for column in plan_columns):
        return None
    runs = runs.dropna(subset=[*plan_columns, "plan_predicted_cuda_allocated_gb"])
    if runs.empty:
        return None
    rows = []
    for _, run in runs.iterrows():
        device = measured_device(run.get("memory_kind"))
        plan = {k.removeprefix("plan_"): v for k, v in run.items() if str(k).startswith("plan_")}
        for term, gb in memory_terms(plan, device).items():
            rows.append({"run_id": run["run_id"], "term": term, "gb": gb, "device": device})
    terms = pd.DataFrame(rows)
    present = set(terms["term"])
    term_order = [*MEMORY_TERMS, *(t for t in OVERHEAD_TERMS.values() if t in present)]
    colours = list(TERM_COLOURS)
    if GATHERED_TERM in present:  # per GPU: a sharded run's bar is one rank's
        term_order.insert(1, GATHERED_TERM)
        colours.insert(1, GATHERED_COLOUR)
    order = list(runs.sort_values("peak_memory_gb", na_position="last")["run_id"])
    y = alt.Y("run_id:N", sort=order, title="run")
    bars = (
        alt.Chart(terms)
        .transform_calculate(term_index=f"indexof({term_order!r}, datum.term)")
        .mark_bar()
        .encode(
            x=alt.X("gb:Q", title=style.memory_title, stack="zero"),
            y=y,
            color=alt.Color(
                "term:N",
                title="planned term",
                sort=term_order,
                scale=alt.Scale(domain=term_order, range=colours),
            ),
            order=alt.Order("term_index:Q"),
            tooltip=[
                alt.Tooltip("run_id:N", title="run"),
                alt.Tooltip("term:N", title="term"),
                alt.Tooltip("gb:Q", title="predicted (GB)", format=".3f"),
                alt.Tooltip("device:N", title="planned for"),
            ],
        )
    )
    measured = runs.dropna(subset=["peak_memory_gb"])
    peak = (
        alt.Chart(measured)
        .mark_tick(color="black", thickness=3, size=16)
        .encode(x=alt.X("peak_memory_gb:Q", title=style.memory_title), y=y, tooltip=style.tooltip(measured))
    )
    return alt.layer(bars, peak).properties(
        width=WIDTH * 1.4, height=alt.Step(20), title="Where the memory goes: planned terms vs measured peak"
    )


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return {"memory_plan": memory_plan_table(study.runs)}


def findings(study: Study) -> list[str | None]:
    return [memory_plan_finding(study.tables.get("memory_plan"))]


def charts(study: Study, style: Style) -> dict[str, alt.Chart | None]:
    if "plan_predicted_cpu_gb" in study.runs and "plan_adapter_weights_gb" not in study.runs:
        log.warning("no memory breakdown chart: plan.csv predates its terms (snakemake -R plan redraws it)")
    return {"memory_breakdown": memory_breakdown(style)}


QUESTION = Question(
    anchor="memory",
    title="Where the memory goes",
    tables=tables,
    findings=findings,
    charts=charts,
    captions={
        "memory_breakdown": "Where each run's memory goes: the planner's terms stacked, with the measured peak as a "
        "black tick.",
    },
    titles={
        "memory_plan": "Memory plan: predicted vs measured peak memory",
    },
    definitions={
        "memory plan": "peak training memory predicted before training, without loading weights (plan step), "
        "compared with the training phase's own measured peak (after the load and the logits check; "
        "measured_phase says which): "
        "weights by quantization, LoRA weights + gradients + AdamW states, activations saved for the backward "
        "pass of the run's largest batch, output-head logits and overhead; compared with the measured peak of "
        "the same kind (CUDA: NVML; CPU: process RSS). error = (predicted - measured) / measured.",
    },
)
