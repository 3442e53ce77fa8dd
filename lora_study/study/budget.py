"""The memory budget's verdict on one run, and the devices a `training.gpus: auto` run gets, from its row of
plan.csv.

Light on purpose (no torch): the Snakefile asks it for every run when it
builds the job graph, and the train job asks it again before loading anything.
"""

from __future__ import annotations

import math
from typing import Any

AUTO = "auto"
# The device counts `training.gpus: auto` chooses from, and the planner predicts every run on: one node's.
GPU_COUNTS = (1, 2, 4, 8)


def per_gpu_column(device: str, gpus: int) -> str:
    """plan.csv's column with a run's predicted peak per device when it is sharded over `gpus` devices."""
    return f"predicted_{device}_gb_{gpus}gpu"


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def budget_verdict(
    plan_row: dict[str, Any] | None, plan_settings: dict[str, Any], gpus: int | None = None
) -> dict[str, Any] | None:
    """{"skip": True, predicted and budget} when the run is predicted not to fit; else None.

    Only the prediction for the configured device counts (plan.device), so a
    budget edit changes the verdict of exactly the runs whose prediction
    crosses it. With `gpus`, the prediction for that many devices (an auto
    run's choice); else the row's own.
    """
    budget = plan_settings["memory_budget_gb"]
    if budget is None or plan_row is None:
        return None
    device = plan_settings["device"]
    column = per_gpu_column(device, gpus) if gpus is not None else f"predicted_{device}_gb"
    predicted = _number(plan_row.get(column))
    # No prediction (the planner failed on this run): it trains, and the report says so.
    if not math.isfinite(predicted) or predicted <= budget:
        return None
    return {"skip": True, "predicted_gb": round(predicted, 3), "budget_gb": budget, "plan_device": device}


def gpus_needed(plan_row: dict[str, Any], device: str, budget_gb: float) -> int | None:
    """The fewest devices (of GPU_COUNTS) whose per-device prediction fits `budget_gb`; None when none does."""
    for gpus in GPU_COUNTS:
        predicted = _number(plan_row.get(per_gpu_column(device, gpus)))
        if math.isfinite(predicted) and predicted <= budget_gb:
            return gpus
    return None


def auto_gpus(plan_row: dict[str, Any] | None, plan_settings: dict[str, Any]) -> int:
    """What `training.gpus: auto` trains on: the fewest devices whose predicted peak per device fits
    plan.memory_budget_gb; one without a budget or a prediction; where no count fits, the count predicted to
    need the least (the run is then skipped with that prediction)."""
    budget = plan_settings["memory_budget_gb"]
    if plan_row is None or budget is None:
        return 1
    device = plan_settings["device"]
    needed = gpus_needed(plan_row, device, budget)
    if needed is not None:
        return needed
    predicted = {gpus: _number(plan_row.get(per_gpu_column(device, gpus))) for gpus in GPU_COUNTS}
    finite = {gpus: value for gpus, value in predicted.items() if math.isfinite(value)}
    return min(finite, key=lambda gpus: (finite[gpus], gpus)) if finite else 1
