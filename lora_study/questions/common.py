"""What the questions share: the slice of runs that varies along one axis, the columns every table carries
(measured values, status, seeds' spread, verdicts) and how numbers are written in sentences."""

from __future__ import annotations

import math

import pandas as pd

from lora_study.analysis.runs import status_label, trained_runs
from lora_study.core.formats import SIXTEEN_BIT
from lora_study.stats.verdicts import Comparison

# The unquantized reference of memory and of the base model's quantization cost: highest precision first.
REFERENCE_FORMATS = ("fp32", SIXTEEN_BIT, "bf16", "fp16")


# Settings that apply to some weight formats only: runs that differ only in them are still comparable.
FORMAT_SPECIFIC_SETTINGS = ("training.compute_dtype",)


def training_columns(runs: pd.DataFrame) -> list[str]:
    return [c for c in runs.columns if c.startswith("training.") and c not in FORMAT_SPECIFIC_SETTINGS]


def sweep_slice(runs: pd.DataFrame, axis: str, fixed: list[str]) -> pd.DataFrame | None:
    """The runs that vary only along `axis` (all else equal), the largest such set.

    Among equally large sets (a rank sweep at each of several learning rates)
    the one through the best run (lowest perplexity). None when no set has two
    or more values of the axis: a study without that axis gets no table for it.
    """
    trained = trained_runs(runs)
    if trained.empty:
        return None
    # Runs of different methods (or rank patterns) are only compared along the method axis itself.
    keys = [key for key in [*fixed, "method", "rank_pattern", *training_columns(trained)] if key != axis]

    def rank_of(group: pd.DataFrame) -> tuple[int, float]:
        best_perplexity = group["perplexity"].where(group["fits"]).min()
        return group[axis].nunique(), -(best_perplexity if pd.notna(best_perplexity) else math.inf)

    groups = [group for _, group in trained.groupby(keys, dropna=False, sort=False) if group[axis].nunique() >= 2]
    return max(groups, key=rank_of) if groups else None


NOISE_COLUMNS = ("n", "perplexity_std", "perplexity_ci95", "accuracy_ci95")


def add_noise(table: pd.DataFrame, group: pd.DataFrame) -> pd.DataFrame:
    """Seed count and spread beside the means, when any configuration has replicates."""
    if "n" not in group or group["n"].max() < 2:
        return table
    for column in NOISE_COLUMNS:
        if column in group:
            table[column] = group[column].to_numpy()
    return table


def measured(group: pd.DataFrame, *columns: str) -> dict[str, pd.Series]:
    """The group's metric columns, empty where the run did not fit."""
    return {column: group[column].where(group["fits"]) for column in columns}


def status_column(group: pd.DataFrame) -> pd.Series:
    return group["status"].map(status_label)


def with_accuracy(columns: list[str], frame: pd.DataFrame) -> list[str]:
    if "accuracy" not in frame or frame["accuracy"].isna().all():
        return [c for c in columns if c != "accuracy"]
    return columns


def reference_row(measured: pd.DataFrame) -> pd.Series | None:
    """The highest-precision unquantized row among `measured` (REFERENCE_FORMATS order), or None."""
    for precision in REFERENCE_FORMATS:
        match = measured[measured["quantization"] == precision]
        if len(match):
            return match.iloc[0]
    return None


def dtype_columns(group: pd.DataFrame) -> dict[str, pd.Series]:
    """What the weights were held in and what the run computed in, as resolved on its device."""
    columns = {}
    for name in ("weight_format", "compute_dtype"):
        if name in group:
            columns[name] = group[name]
    return columns


VERDICT_COLUMNS = ("change_low_pct", "change_high_pct", "verdict", "noise")


def with_verdicts(table: pd.DataFrame, comparisons: list[Comparison | None]) -> pd.DataFrame:
    """Interval and verdict columns beside each compared row (empty where there was nothing to compare)."""
    table = table.copy()
    table["change_low_pct"] = [100 * c.low if c else float("nan") for c in comparisons]
    table["change_high_pct"] = [100 * c.high if c else float("nan") for c in comparisons]
    table["verdict"] = [c.verdict.value if c else "" for c in comparisons]
    table["noise"] = [c.sources if c else "" for c in comparisons]
    table.attrs["comparisons"] = comparisons
    return table


def sig(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}"


def unjudged(subject: str) -> str:
    return f"{subject}: not judged (no per-row scores to compare)."


def partial_coverage(target_layers: object) -> list[str]:
    """The parts of a run's target_layers ('q: 8/32 layers; mlp: 32/32 layers') that reached some layers, not
    all: ['q: 8/32 layers']."""
    parts = []
    for part in str(target_layers or "").split("; "):
        counts = part.rsplit(": ", 1)[-1].removesuffix(" layers").split("/")
        if len(counts) == 2 and counts[0].isdigit() and counts[1].isdigit() and 0 < int(counts[0]) < int(counts[1]):
            parts.append(part)
    return parts
