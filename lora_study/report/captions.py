"""What each chart shows, in one sentence: under it on the findings page and in the Snakemake report
(no heavy imports: the Snakefile passes these to the report's caption template)."""

from __future__ import annotations

HEATMAP_PREFIX = "heatmap__"

# One sentence per chart: under it on the findings page and in the Snakemake report.
CHART_CAPTIONS = {
    "quality_vs_rank": "Perplexity and accuracy of the rank sweep, each with its own 95 % interval (where the "
    "configuration is); a tick at every swept rank. Whether two ranks differ is the comparisons chart's question.",
    "comparisons": "Each verdict's perplexity change against its reference with the interval the verdict rests "
    "on, over the grey tolerance band of its sentence. These intervals are paired (same rows, shared seeds) and "
    "so much narrower than two configurations' own error bars, which each carry the noise both share: bars that "
    "overlap can still differ.",
    "memory_vs_rank": "Peak memory of each rank of the sweep (bars from zero: what rank adds is small against "
    "the base).",
    "memory_vs_perplexity": "Every fitting run by peak memory and perplexity (95 % intervals); the dashed line "
    "is the Pareto frontier and only its points are labelled.",
    "perplexity_by_modules": "Perplexity per target-module set (95 % intervals) beside the trainable parameters "
    "each set adds.",
    "quantization": "Perplexity (95 % intervals) and peak memory per weight format, at the same rank and modules.",
    "loss_curves": "Training loss on the response tokens at each optimizer step, one line per run.",
    "time_vs_memory": "Training time (sum of the optimizer steps) against peak memory per run.",
    "memory_breakdown": "Where each run's memory goes: the planner's terms stacked, with the measured peak as a "
    "black tick.",
    "effective_rank": "Effective rank (90 % of the update's energy) per module group against the adapter's rank; "
    "the dashed line is full use.",
    "downstream": "lm-eval score per task with its 95 % interval (± 1.96 standard errors); the verdict against "
    "the base model is in the tooltip.",
    "serving": "Milliseconds per generated token at batch 1 for each run and each way it can be deployed.",
    "heatmap": "Perplexity of every cell of a two-axis matrix, the value written in each cell.",
}


def chart_caption(name: str) -> str:
    """The caption of a chart by its file stem (every two-axis heatmap shares one)."""
    return CHART_CAPTIONS["heatmap" if name.startswith(HEATMAP_PREFIX) else name]
