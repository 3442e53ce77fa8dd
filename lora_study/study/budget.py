"""The memory budget's verdict on one run, from its row of plan.csv.

Light on purpose (no torch): the Snakefile asks it for every run when it
builds the job graph, and the train job asks it again before loading anything.
"""

from __future__ import annotations

import math
from typing import Any


def budget_verdict(plan_row: dict[str, Any] | None, plan_settings: dict[str, Any]) -> dict[str, Any] | None:
    """{"skip": True, predicted and budget} when the run is predicted not to fit; else None.

    Only the prediction for the configured device counts (plan.device), so a
    budget edit changes the verdict of exactly the runs whose prediction
    crosses it.
    """
    budget = plan_settings["memory_budget_gb"]
    if budget is None or plan_row is None:
        return None
    device = plan_settings["device"]
    try:
        predicted = float(plan_row[f"predicted_{device}_gb"])
    except (TypeError, ValueError):
        return None
    # No prediction (the planner failed on this run): it trains, and the report says so.
    if not math.isfinite(predicted) or predicted <= budget:
        return None
    return {"skip": True, "predicted_gb": round(predicted, 3), "budget_gb": budget, "plan_device": device}
