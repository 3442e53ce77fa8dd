"""The runs table as the report reads it: labels to group by, which rows are base models, each run's base
perplexity, how its memory was measured, and each configuration's own interval."""

from __future__ import annotations

import pandas as pd

from lora_study.core.formats import quantization_label
from lora_study.stats.verdicts import Judge
from lora_study.study.methods import LORA, default_alpha
from lora_study.study.modules import modules_label
from lora_study.study.sweep import RANK_PATTERN_PREFIX, baseline_id

# How a run that produced no measurement appears in tables and sentences.
STATUS_LABELS = {
    "oom": "does not fit (out of memory)",
    "skipped": "skipped (predicted over the memory budget)",
}


def prepare(table: pd.DataFrame) -> pd.DataFrame:
    """Add the labels the findings group by; keep the runs table's order."""
    runs = table.copy()
    runs["modules_label"] = [
        modules_label(str(m).split(",")) if isinstance(m, str) and m else "none" for m in runs["modules"]
    ]
    runs["quant_label"] = [
        quantization_label(q, bool(dq)) for q, dq in zip(runs["quantization"], runs["double_quant"], strict=True)
    ]
    runs["fits"] = runs["status"].fillna("ok").eq("ok")
    # Tables from before the method axis hold LoRA runs only.
    runs["method"] = runs["method"].fillna(LORA) if "method" in runs else LORA
    runs["rank_pattern"] = runs["rank_pattern"].fillna("").astype(str) if "rank_pattern" in runs else ""
    runs["variant"] = [f"{m}+{RANK_PATTERN_PREFIX}{p}" if p else m for m, p in zip(runs["method"], runs["rank_pattern"],
                                                                                     strict=True)]  # fmt: skip
    runs["alpha_ratio"] = (runs["alpha"] / runs["rank"].where(runs["rank"] > 0)).round(6)
    # Runs along a rank axis share their alpha rule: the method's default (2r; rsLoRA a constant), else k x r.
    runs["alpha_rule"] = [
        "default" if alpha == default_alpha(method, rank) else f"{ratio:g}r"
        for alpha, method, rank, ratio in zip(
            runs["alpha"], runs["method"], runs["rank"], runs["alpha_ratio"], strict=True
        )
    ]
    runs["base_perplexity"] = base_perplexities(runs)
    return runs


def trained_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[~runs["is_baseline"].astype(bool)]


def baselines(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["is_baseline"].astype(bool)]


def baseline_ids(runs: pd.DataFrame) -> list[str]:
    """Each row's baseline: the id of the base model in the row's own weight format."""
    return [baseline_id(q, bool(dq)) for q, dq in zip(runs["quantization"], runs["double_quant"], strict=True)]


def base_perplexities(runs: pd.DataFrame) -> pd.Series:
    """Each row's baseline perplexity: the base model in the row's own weight format (NaN without one)."""
    base = baselines(runs)
    by_id = dict(zip(base["run_id"], base["perplexity"].where(base["fits"]), strict=True))
    return pd.Series([by_id.get(i, float("nan")) for i in baseline_ids(runs)], index=runs.index, dtype=float)


def status_label(status: object) -> str:
    status = "ok" if pd.isna(status) else str(status)
    return STATUS_LABELS.get(status, status)


def memory_label(runs: pd.DataFrame) -> str:
    """How peak memory was measured, for table headers ('GPU memory' only when it was)."""
    kinds = set(runs["memory_kind"].dropna())
    if kinds and all(k.startswith("cuda") for k in kinds):
        return "peak GPU memory (NVML / torch)"
    if kinds == {"cpu_peak_rss"}:
        return "peak CPU memory (process RSS; no GPU was used)"
    return "peak memory (mixed devices: " + ", ".join(sorted(kinds)) + ")"


# Axis titles per memory kind (lora_study.core.metrics.PeakMemory): the unit and what was measured on which device.
MEMORY_AXIS_TITLES = {
    "cuda_nvml_process": "peak GPU memory (GB, per process)",
    "cuda_nvml_device_delta": "peak GPU memory (GB, device-wide increase)",
    "cuda_torch_reserved": "peak GPU memory (GB, torch reserved)",
    "cpu_peak_rss": "peak CPU RSS (GB)",
}


def memory_axis_title(runs: pd.DataFrame) -> str:
    """A chart axis title for the peak_memory_gb column: unit and device."""
    kinds = set(runs["memory_kind"].dropna())
    if len(kinds) == 1:
        return MEMORY_AXIS_TITLES.get(kinds.pop(), "peak memory (GB)")
    if kinds and all(k.startswith("cuda") for k in kinds):
        return "peak GPU memory (GB)"
    return "peak memory (GB, GPU and CPU runs mixed)"


def with_own_intervals(table: pd.DataFrame, judge: Judge) -> pd.DataFrame:
    """Each configuration's own 95 % interval of perplexity and accuracy (error bars), where it has row scores."""
    for metric in ("perplexity", "accuracy"):
        if metric not in table:
            continue
        bounds = [judge.own_interval(run_id, metric) for run_id in table["run_id"]]
        position = table.columns.get_loc(metric) + 1
        table.insert(position, f"{metric}_high", [high for _, high in bounds])
        table.insert(position, f"{metric}_low", [low for low, _ in bounds])
    return table
