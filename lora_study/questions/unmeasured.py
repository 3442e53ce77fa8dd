"""What the study could not measure: runs that did not fit or were skipped, and later stages that ran out
of memory."""

from __future__ import annotations

import pandas as pd

from lora_study.analysis.runs import (
    status_label,
    trained_runs,
)
from lora_study.report.question import Question, Study


def oom_finding(downstream: pd.DataFrame | None, deploy: pd.DataFrame | None,
                anatomy: pd.DataFrame | None = None) -> str | None:  # fmt: skip
    """The parts of the downstream, deploy and anatomy stages that ran out of memory (recorded, not crashed)."""
    parts = []
    for stage, frame, what in (("lm-eval", downstream, None), ("deploy", deploy, "form"), ("anatomy", anatomy, None)):
        if frame is None or "oom" not in frame:
            continue
        for row in frame[frame["oom"].notna() & frame["oom"].astype(str).ne("")].to_dict("records"):
            where = f" ({row[what]})" if what else ""
            parts.append(f"{stage} of {row['run_id']}{where}: {row['oom']}")
    if not parts:
        return None
    return "Did not fit in memory (recorded as data; the rest of the study was measured): " + "; ".join(parts) + "."


def not_measured_finding(runs: pd.DataFrame) -> str | None:
    trained = trained_runs(runs)
    not_fitting = trained[~trained["fits"]]
    if not len(not_fitting):
        return None
    listed = [f"{row.run_id} {status_label(row.status)}" for row in not_fitting.itertuples()]
    return "Not measured: " + "; ".join(listed) + "."


def findings(study: Study) -> list[str | None]:
    deployment = study.deployment
    return [oom_finding(deployment.downstream, deployment.deploy, study.anatomy), not_measured_finding(study.runs)]


QUESTION = Question(anchor="unmeasured", title="What could not be measured", findings=findings)
