"""Training loss per optimizer step, one line per run."""

from __future__ import annotations

import altair as alt
import pandas as pd

from lora_study.report.question import Question, Study
from lora_study.report.style import HEIGHT, WIDTH, Style


def loss_curves(curves: pd.DataFrame, style: Style) -> alt.Chart | None:
    if curves.empty:
        return None
    frame = style.with_runs(curves[["run_id", "step", "loss"]])
    return (
        alt.Chart(frame, title="Training loss per optimizer step")
        .mark_line(strokeWidth=1.5)
        .encode(
            x=alt.X("step:Q", title="optimizer step"),
            y=alt.Y("loss:Q", title="training loss (response tokens, nats)", scale=alt.Scale(zero=False)),
            color=style.colour(frame),
            strokeDash=style.dash(frame),
            detail="run_id:N",
            tooltip=[
                alt.Tooltip("run_id:N", title="run"),
                "step:Q",
                alt.Tooltip("loss:Q", format=".4f"),
                *style.tooltip(frame)[1:],
            ],
        )
        .properties(width=WIDTH * 1.4, height=HEIGHT)
    )


def charts(study: Study, style: Style) -> dict[str, alt.Chart | None]:
    return {"loss_curves": loss_curves(study.curves, style)}


QUESTION = Question(
    anchor="loss",
    title="Training loss",
    charts=charts,
    captions={
        "loss_curves": "Training loss on the response tokens at each optimizer step, one line per run.",
    },
)
