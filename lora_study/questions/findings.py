"""Derived tables and finding sentences, computed from the runs table.

Every derived number has one definition here; report.py prints these
definitions in the report's methods section (DEFINITIONS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from lora_study.core.formats import SIXTEEN_BIT, UNQUANTIZED, quantization_label
from lora_study.stats.verdicts import ALPHA, SEED_BOUND, Comparison, Judge, Verdict, against_best
from lora_study.study.methods import LORA, default_alpha
from lora_study.study.modules import modules_label
from lora_study.study.sweep import baseline_id

# The unquantized reference of memory and of the base model's quantization cost: highest precision first.
REFERENCE_FORMATS = ("fp32", SIXTEEN_BIT, "bf16", "fp16")
# How a run that produced no measurement appears in tables and sentences.
STATUS_LABELS = {
    "oom": "does not fit (out of memory)",
    "skipped": "skipped (predicted over the memory budget)",
}

DEFINITIONS: dict[str, str] = {
    "memory plan": "peak training memory predicted before training, without loading weights (plan step), "
    "compared with the training phase's own measured peak (after the load and the logits check; "
    "measured_phase says which): "
    "weights by quantization, LoRA weights + gradients + AdamW states, activations saved for the backward "
    "pass of the run's largest batch, output-head logits and overhead; compared with the measured peak of "
    "the same kind (CUDA: NVML; CPU: process RSS). error = (predicted - measured) / measured.",
    "perplexity": "exp of the token-weighted mean negative log-likelihood over the response tokens "
    "of the validation split.",
    "quality_per_gb": "(perplexity of the base model in the run's weight format - perplexity of the run) / "
    "peak memory in GB: perplexity reduction bought per GB.",
    "base_quantization_cost": "(perplexity of the base model in a weight format - perplexity of the "
    "unquantized base model) / perplexity of the unquantized base model: what quantizing the base model "
    "costs before any adapter is trained.",
    "sweet_spot": "the smallest rank of the rank sweep whose perplexity is *equivalent* to the best rank's "
    "(tolerance sweet_spot_tolerance = {sweet_spot_tolerance:.0%}), every smaller rank being *worse*; "
    "otherwise the sentence says the comparison is inconclusive. The best rank is picked from the data, so m = "
    "k(k-1)/2, every pair of the k ranks tried (simultaneous intervals over them).",
    "diminishing": "each rank step is compared with the rank before it at tolerance min_relative_gain = "
    "{min_relative_gain:.0%}: *better* = worth it, *equivalent* = not worth it. Returns diminish above rank r "
    "when every step after r is equivalent or worse and the step into r (if any) is better; m = the number of "
    "steps.",
    "marginal_gain_per_gb": "perplexity reduction of a rank step divided by the extra peak memory it "
    "costs (empty when memory did not grow).",
    "pareto": "a run is Pareto-optimal when no other run is at least as good on both axes and "
    "strictly better on one (lower is better on both).",
    "quality_change": "(perplexity - best perplexity of the sweep) / best perplexity.",
    "memory_saved": "1 - peak memory / peak memory of the highest-precision unquantized run.",
    "time_per_gb": "training wall time in seconds / peak memory in GB.",
    "decision": "for each memory budget, among the runs whose peak memory is at most the budget: the best is "
    "the lowest mean perplexity; the pick is the cheapest run (least memory, then least training time) that is "
    "*equivalent* to the best (tolerance sweet_spot_tolerance), else the best itself; cheaper runs whose "
    "comparison was inconclusive are named. m = k(k-1)/2 over the k runs within the budget (the best is picked from "
    "them). When memory was measured on a CPU, "
    "the same table is also given on the planner's predicted GPU memory, labelled as predicted.",
    "verdicts": "a candidate against a reference on perplexity: change = perplexity ratio - 1, from the "
    "difference of mean log perplexities (log perplexity linearised per row, so it is a mean over rows). Its "
    "variance has a row part (the spread of the per-row differences over the validation rows both runs are "
    "scored on, less the seed x row interaction the seed part holds) and a seed part (the spread of per-seed "
    "means, two-way ANOVA of each seeds x rows table): paired by seed when both configurations share their "
    "seeds; a trained configuration with one seed borrows the seed variance pooled over every configuration "
    "with two or more seeds (sweep.noise_replicates replicates the centre configuration for this); the base "
    "model, not trained, has none. Degrees of freedom: Welch-Satterthwaite over both parts, with the seed part "
    f"taken at its upper {SEED_BOUND:.0%} confidence bound for the df only (with few seeds the plain estimate's "
    "df are too high when the seed part comes out small). Difference interval: estimate +- t(1 - alpha/(2m)) x "
    "SE; equivalence interval (two one-sided tests, TOST): estimate +- t(1 - alpha/m) x SE, with alpha = "
    + f"{ALPHA:g}"
    + ", m the number of comparisons the sentence rests on (Bonferroni, so verdicts and the printed intervals "
    "agree; a sentence that picks the best of k and compares the others with it rests on all k(k-1)/2 pairs). "
    "Verdict: *equivalent* when the equivalence interval lies inside (-t, +t) (checked first; 'a real but "
    "negligible change' when the difference interval also excludes 0); else *better*/*worse* when the "
    "difference interval excludes 0; else *inconclusive*, with the seeds per configuration or validation rows "
    "that would decide it under the same variance model and t quantile (or that rows alone cannot). Accuracy: "
    "the same with the difference of exact-match rates, paired over the same prompts. Calibration on simulated "
    "studies with a known truth: bench/calibration.py.",
    "share_of_full": "(perplexity of the unquantized base model - perplexity of the run) / (perplexity of the "
    "unquantized base - perplexity of the best full fine-tuning run): the share of full fine-tuning's improvement "
    "a run recovers (accuracy: the same with accuracy gains); a quantized run's quantization cost counts against "
    "it. memory_vs_full, time_vs_full: peak memory and training time over full fine-tuning's. The 90% claim is "
    "tested one-sided against full fine-tuning at the perplexity change a 90% share allows.",
    "effective_rank": "per layer, the update is the merged weight minus the base weight, in fp32 on the base "
    "weight the run trained against (bitsandbytes weights dequantized; PiSSA/OLoRA adapters converted for the "
    "original base); full fine-tuning: trained minus base weight. Its effective rank is the fewest singular "
    "directions holding 90% of its energy (squared singular values). Utilisation = effective rank / adapter "
    "rank: saturated at >= 75% (the adapter may want more rank), oversized at <= 25%; above 100% (DoRA's "
    "rescaled magnitudes, PiSSA/OLoRA saved converted at rank 2r) the update is not confined to r directions.",
    "learning_rate_per_rank": "in a rank x learning-rate matrix, the best learning rate of a rank is its "
    "lowest perplexity; at every rank, each other rank's best learning rate is compared with the rank's own "
    "best (tolerance sweet_spot_tolerance, m = every pair of learning rates within each rank, as each rank's best is "
    "picked from them): *worse* anywhere = it moves "
    "with rank.",
    "methods": "each LoRA variant against the plain LoRA run of its block (same rank, target modules, weight "
    "format and training settings; tolerance min_relative_gain, m = the number of variants in the block); "
    "scale = alpha/r (rslora: alpha/sqrt(r)).",
    "noise": "metrics of a configuration with seeds are means over them, _ci95 the half-width of their 95 % "
    "t-interval; perplexity_low/high are each configuration's own 95 % interval (rows plus its seed part, own or "
    "pooled, t on the Welch-Satterthwaite df), drawn as error bars; accuracy_low/high a Wilson score interval on "
    "the effective number of prompts (p(1-p) / the same two-source variance), within 0 and 1 and not empty at 0 "
    "hits. Error bars answer 'where is this configuration'; whether two differ is the paired comparison of the "
    "verdicts (the comparison chart), which is much narrower when rows and seeds are shared.",
}


@dataclass(frozen=True)
class FindingSettings:
    sweet_spot_tolerance: float = 0.02
    min_relative_gain: float = 0.01
    memory_budgets_gb: tuple[float, ...] = (6, 8, 12, 16, 24, 40, 80)


# --- preparing the runs table ------------------------------------------------------------


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


# Settings that apply to some weight formats only: runs that differ only in them are still comparable.
FORMAT_SPECIFIC_SETTINGS = ("training.compute_dtype",)


def _training_columns(runs: pd.DataFrame) -> list[str]:
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
    # Runs of different methods are only compared along the method axis itself.
    keys = [key for key in [*fixed, "method", *_training_columns(trained)] if key != axis]

    def rank_of(group: pd.DataFrame) -> tuple[int, float]:
        best_perplexity = group["perplexity"].where(group["fits"]).min()
        return group[axis].nunique(), -(best_perplexity if pd.notna(best_perplexity) else math.inf)

    groups = [group for _, group in trained.groupby(keys, dropna=False, sort=False) if group[axis].nunique() >= 2]
    return max(groups, key=rank_of) if groups else None


# --- derived tables ------------------------------------------------------------------------


NOISE_COLUMNS = ("n", "perplexity_std", "perplexity_ci95", "accuracy_ci95")


def _add_noise(table: pd.DataFrame, group: pd.DataFrame) -> pd.DataFrame:
    """Seed count and spread beside the means, when any configuration has replicates."""
    if "n" not in group or group["n"].max() < 2:
        return table
    for column in NOISE_COLUMNS:
        if column in group:
            table[column] = group[column].to_numpy()
    return table


def _measured(group: pd.DataFrame, *columns: str) -> dict[str, pd.Series]:
    """The group's metric columns, empty where the run did not fit."""
    return {column: group[column].where(group["fits"]) for column in columns}


def status_label(status: object) -> str:
    status = "ok" if pd.isna(status) else str(status)
    return STATUS_LABELS.get(status, status)


def _status(group: pd.DataFrame) -> pd.Series:
    return group["status"].map(status_label)


def _with_accuracy(columns: list[str], frame: pd.DataFrame) -> list[str]:
    if "accuracy" not in frame or frame["accuracy"].isna().all():
        return [c for c in columns if c != "accuracy"]
    return columns


def rank_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    group = sweep_slice(runs, "rank", ["modules_label", "quant_label", "alpha_rule"])
    if group is None:
        return None
    group = group.sort_values("rank")
    table = pd.DataFrame(
        {
            "run_id": group["run_id"],
            "rank": group["rank"],
            "modules": group["modules_label"],
            "quantization": group["quant_label"],
            **_measured(group, "perplexity", "accuracy", "peak_memory_gb", "train_wall_s"),
            "quality_per_gb": (group["base_perplexity"] - group["perplexity"]) / group["peak_memory_gb"],
            "status": _status(group),
        }
    )
    table = _add_noise(table, group)
    return table[_with_accuracy(list(table.columns), table)].reset_index(drop=True)


def partial_coverage(target_layers: object) -> list[str]:
    """The parts of a run's target_layers ('q: 8/32 layers; mlp: 32/32 layers') that reached some layers, not
    all: ['q: 8/32 layers']."""
    parts = []
    for part in str(target_layers or "").split("; "):
        counts = part.rsplit(": ", 1)[-1].removesuffix(" layers").split("/")
        if len(counts) == 2 and counts[0].isdigit() and counts[1].isdigit() and 0 < int(counts[0]) < int(counts[1]):
            parts.append(part)
    return parts


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
            **_measured(group, "perplexity", "accuracy"),
            "trainable_params": group["trainable_params"].astype("Int64"),
            **_measured(group, "peak_memory_gb"),
            "status": _status(group),
        }
    )
    table = _add_noise(table, group)
    return table[_with_accuracy(list(table.columns), table)].reset_index(drop=True)


def _reference_row(measured: pd.DataFrame) -> pd.Series | None:
    """The highest-precision unquantized row among `measured` (REFERENCE_FORMATS order), or None."""
    for precision in REFERENCE_FORMATS:
        match = measured[measured["quantization"] == precision]
        if len(match):
            return match.iloc[0]
    return None


def quantization_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    group = sweep_slice(runs, "quant_label", ["rank", "alpha", "modules_label"])
    if group is None:
        return None
    fitting = group[group["fits"]]
    best = fitting["perplexity"].min()
    reference = _reference_row(fitting)
    saved = 1 - group["peak_memory_gb"] / float(reference["peak_memory_gb"]) if reference is not None else float("nan")
    table = pd.DataFrame(
        {
            "run_id": group["run_id"],
            "quantization": group["quant_label"],
            **_dtype_columns(group),
            "rank": group["rank"],
            "modules": group["modules_label"],
            **_measured(group, "perplexity", "accuracy", "peak_memory_gb"),
            "quality_change_pct": 100 * (group["perplexity"] - best) / best,
            "memory_saved_pct": 100 * saved,
            "status": _status(group),
        }
    )
    table.loc[~group["fits"].to_numpy(), ["quality_change_pct", "memory_saved_pct"]] = float("nan")
    table = _add_noise(table, group)
    return table[_with_accuracy(list(table.columns), table)].reset_index(drop=True)


def _dtype_columns(group: pd.DataFrame) -> dict[str, pd.Series]:
    """What the weights were held in and what the run computed in, as resolved on its device."""
    columns = {}
    for name in ("weight_format", "compute_dtype"):
        if name in group:
            columns[name] = group[name]
    return columns


def base_quantization_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """The base model (no adapter) per weight format vs the unquantized base: what quantizing it costs."""
    base = baselines(runs)
    if len(base) < 2:
        return None
    reference = _reference_row(base[base["fits"]])
    reference_ppl = float(reference["perplexity"]) if reference is not None else float("nan")
    table = pd.DataFrame(
        {
            "run_id": base["run_id"],
            "quantization": base["quant_label"],
            **_dtype_columns(base),
            **_measured(base, "perplexity", "accuracy", "peak_memory_gb"),
            "perplexity_change_pct": 100 * (base["perplexity"] - reference_ppl) / reference_ppl,
            "status": _status(base),
        }
    )
    return table[_with_accuracy(list(table.columns), table)].reset_index(drop=True)


def base_quantization_finding(table: pd.DataFrame | None, judge: Judge, settings: FindingSettings) -> str | None:
    """One sentence: each quantized base's perplexity against the unquantized base's, with its verdict
    (tolerance sweet_spot_tolerance, m = the quantized bases)."""
    if table is None:
        return None
    fitting = table.dropna(subset=["perplexity"])
    ref = _reference_row(fitting)  # the table's quantization labels of unquantized bases are their formats
    quantized = fitting.drop(ref.name) if ref is not None else fitting.iloc[0:0]
    if ref is None or quantized.empty:
        return None
    parts = [f"{r['quantization']} {_fmt(r['perplexity'])} ({r['perplexity_change_pct']:+.1f}%)"
             for _, r in quantized.iterrows()]  # fmt: skip
    verdicts = []
    for _, row in quantized.iterrows():
        result = judge.compare(row["run_id"], ref["run_id"], "perplexity", settings.sweet_spot_tolerance,
                               len(quantized))  # fmt: skip
        verdicts.append(f"{row['quantization']} {result.describe() if result else 'not judged'}")
    return (
        f"Cost of quantizing the base model (no adapter): perplexity {_fmt(ref['perplexity'])} with "
        f"{_weights_text(ref)} weights; "
        + ", ".join(parts)
        + f". Against {_weights_text(ref)}: "
        + "; ".join(verdicts)
        + ". Each run's gain is measured against the base model in its own format."
    )


def _weights_text(row: pd.Series) -> str:
    label = str(row["quantization"])
    resolved = row.get("weight_format")
    return f"{label} ({resolved})" if isinstance(resolved, str) and resolved != label else label


def precision_warnings(runs: pd.DataFrame) -> list[str]:
    """Warn when runs of one study computed in different dtypes or ran on different kinds of device."""
    warnings = []
    if "compute_dtype" in runs and "training.compute_dtype" in runs:
        trained = trained_runs(runs).dropna(subset=["compute_dtype"])
        configured = trained["training.compute_dtype"].fillna(trained["quantization"])
        for setting, group in trained.groupby([trained["quantization"], configured], sort=False):
            resolved = sorted(set(group["compute_dtype"]))
            if len(resolved) > 1:
                listed = ", ".join(f"{d} ({(group['compute_dtype'] == d).sum()} runs)" for d in resolved)
                warnings.append(
                    f"Warning: runs with quantization {setting[0]} and compute dtype {setting[1]} resolved to "
                    f"different dtypes on different devices: {listed}; compare them with care."
                )
    if "capability.summary" in runs:
        devices = sorted(set(runs["capability.summary"].dropna()))
        if len(devices) > 1:
            warnings.append(f"Warning: the runs ran on {len(devices)} kinds of device: " + "; ".join(devices) + ".")
    return warnings


def diminishing_returns_table(runs: pd.DataFrame, judge: Judge, settings: FindingSettings) -> pd.DataFrame | None:
    """Each rank step's perplexity change, with its verdict at tolerance min_relative_gain.

    The steps together carry the "returns diminish" sentence: m = the number
    of steps (Bonferroni).
    """
    ranks = rank_table(runs)
    if ranks is None:
        return None
    fitting = ranks.dropna(subset=["perplexity"]).reset_index(drop=True)
    if len(fitting) < 2:
        return None
    before, after = fitting.iloc[:-1].reset_index(drop=True), fitting.iloc[1:].reset_index(drop=True)
    gain = before["perplexity"] - after["perplexity"]
    extra_memory = after["peak_memory_gb"] - before["peak_memory_gb"]
    steps = pd.DataFrame(
        {
            "step": [f"{a} -> {b}" for a, b in zip(before["rank"], after["rank"], strict=True)],
            "from_rank": before["rank"],
            "to_rank": after["rank"],
            "perplexity_change": -gain,
            "perplexity_change_pct": -100 * gain / before["perplexity"],
            "memory_change_gb": extra_memory,
            "time_change_s": after["train_wall_s"] - before["train_wall_s"],
            "marginal_gain_per_gb": (gain / extra_memory).where(extra_memory > 0),
        }
    )
    comparisons = [
        judge.compare(b, a, "perplexity", settings.min_relative_gain, len(steps))
        for a, b in zip(before["run_id"], after["run_id"], strict=True)
    ]
    return _with_verdicts(steps, comparisons)


VERDICT_COLUMNS = ("change_low_pct", "change_high_pct", "verdict", "noise")


def _with_verdicts(table: pd.DataFrame, comparisons: list[Comparison | None]) -> pd.DataFrame:
    """Interval and verdict columns beside each compared row (empty where there was nothing to compare)."""
    table = table.copy()
    table["change_low_pct"] = [100 * c.low if c else float("nan") for c in comparisons]
    table["change_high_pct"] = [100 * c.high if c else float("nan") for c in comparisons]
    table["verdict"] = [c.verdict.value if c else "" for c in comparisons]
    table["noise"] = [c.sources if c else "" for c in comparisons]
    table.attrs["comparisons"] = comparisons
    return table


def time_memory_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    trained = trained_runs(runs)
    if trained.empty:
        return None
    return pd.DataFrame(
        {
            "run_id": trained["run_id"],
            **_measured(trained, "train_wall_s", "peak_memory_gb"),
            "time_per_gb": (trained["train_wall_s"] / trained["peak_memory_gb"]).where(trained["fits"]),
            **_measured(trained, "train_tokens_per_s"),
            "status": _status(trained),
        }
    ).reset_index(drop=True)


def pareto_front(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows not dominated on (x, y), both minimised; equal points are all kept."""
    points = frame.dropna(subset=[x, y])
    keep = []
    for _, row in points.iterrows():
        no_worse = (points[x] <= row[x]) & (points[y] <= row[y])
        better = (points[x] < row[x]) | (points[y] < row[y])
        keep.append(not (no_worse & better).any())
    return points[keep].sort_values([x, y])


def pareto_table(runs: pd.DataFrame, x: str) -> pd.DataFrame | None:
    trained = trained_runs(runs)
    trained = trained[trained["fits"]]
    if trained.empty:
        return None
    front = pareto_front(trained, x, "perplexity")
    columns = _with_accuracy(["run_id", x, "perplexity", "accuracy", "trainable_params"], front)
    return front[columns].reset_index(drop=True)


def decision_table(
    runs: pd.DataFrame, budgets_gb: tuple[float, ...], judge: Judge, settings: FindingSettings
) -> pd.DataFrame | None:
    """Per memory budget: the cheapest fitting run equivalent to the best fitting run.

    Cheapest = least peak memory, then least training time. The best is the
    lowest mean perplexity among the runs that fit; each cheaper run is
    compared with it at tolerance sweet_spot_tolerance (m = every pair of the
    k runs that fit: the best was picked from them). A CPU study adds the same table on the planner's
    predicted GPU memory, labelled as predicted.
    """
    trained = trained_runs(runs)
    if trained.empty:
        return None
    fitting = trained[trained["fits"]].dropna(subset=["perplexity", "peak_memory_gb"])
    bases = [("measured", "peak_memory_gb")]
    measured_on_cpu = not trained["memory_kind"].fillna("").str.startswith("cuda").any()
    if measured_on_cpu and "plan_predicted_cuda_gb" in fitting and fitting["plan_predicted_cuda_gb"].notna().any():
        bases.append(("predicted GPU", "plan_predicted_cuda_gb"))
    rows = []
    for basis, column in bases:
        for budget in budgets_gb:
            rows.append({"memory": basis, "budget_gb": budget,
                         **_cheapest_equivalent(fitting, column, budget, judge, settings)})  # fmt: skip
    table = pd.DataFrame(rows)
    return table[_with_accuracy(list(table.columns), table)]


def _cheapest_equivalent(
    fitting: pd.DataFrame, column: str, budget: float, judge: Judge, settings: FindingSettings
) -> dict[str, Any]:
    candidates = fitting[pd.to_numeric(fitting[column], errors="coerce") <= budget]
    if candidates.empty:
        return {"run_id": "nothing fits"}
    best = candidates.sort_values(["perplexity", column]).iloc[0]
    cheaper = candidates.sort_values([column, "train_wall_s"])
    cheaper = cheaper[cheaper["run_id"] != best["run_id"]]
    cheaper = cheaper[pd.to_numeric(cheaper[column]) <= float(best[column])]
    pick, comparison, undecided = best, None, []
    for _, row in cheaper.iterrows():
        result = judge.compare(row["run_id"], best["run_id"], "perplexity", settings.sweet_spot_tolerance,
                               against_best(len(candidates)))  # fmt: skip
        if result is not None and result.verdict is Verdict.EQUIVALENT:
            pick, comparison = row, result
            break
        if result is None or result.verdict is Verdict.INCONCLUSIVE:
            undecided.append(row["run_id"])
    return {
        "run_id": pick["run_id"],
        "perplexity": pick["perplexity"],
        "accuracy": pick.get("accuracy"),
        "memory_gb": pick[column],
        "train_wall_s": pick["train_wall_s"],
        "best_run_id": best["run_id"],
        "vs_best": comparison.describe() if comparison else "is the best",
        "cheaper_inconclusive": ", ".join(undecided),
    }


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
            "status": _status(trained),
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


# --- finding sentences ----------------------------------------------------------------------


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}"


def _unjudged(subject: str) -> str:
    return f"{subject}: not judged (no per-row scores to compare)."


def sweet_spot_finding(
    ranks: pd.DataFrame | None, judge: Judge, settings: FindingSettings, memory_text: str = "peak memory"
) -> str | None:
    """The smallest rank equivalent to the best rank, every smaller rank shown worse; else inconclusive."""
    if ranks is None:
        return None
    fitting = ranks.dropna(subset=["perplexity"]).sort_values("rank")
    if fitting.empty:
        return None
    best = fitting.loc[fitting["perplexity"].idxmin()]
    smaller = fitting[fitting["rank"] < best["rank"]]
    tolerance = f"tolerance {settings.sweet_spot_tolerance:.0%}"
    if smaller.empty:
        return (f"Sweet-spot rank: {int(best['rank'])}, the smallest rank tried, is also the best "
                f"(perplexity {_fmt(best['perplexity'])}; {_sweep(fitting)}).")  # fmt: skip
    worse, sources = [], ""
    for _, row in smaller.iterrows():
        # The best rank was picked from the data: every pair of the ranks tried is a comparison it could show.
        result = judge.compare(row["run_id"], best["run_id"], "perplexity", settings.sweet_spot_tolerance,
                               against_best(len(fitting)))  # fmt: skip
        if result is None:
            return _unjudged("Sweet-spot rank")
        if result.verdict is Verdict.EQUIVALENT:
            shown = f"; smaller ranks are worse ({'; '.join(worse)})" if worse else ""
            ratio = row["peak_memory_gb"] / best["peak_memory_gb"]
            return (
                f"Sweet-spot rank: {int(row['rank'])} (perplexity {_fmt(row['perplexity'])}) is equivalent to the "
                f"best rank {int(best['rank'])} ({_fmt(best['perplexity'])}) within the {tolerance}: "
                f"{result.describe()}, at {ratio:.0%} of its peak memory ({memory_text}){shown}."
            )
        if result.verdict is not Verdict.WORSE:
            return (
                f"Sweet-spot rank: inconclusive. Rank {int(row['rank'])} against the best rank "
                f"{int(best['rank'])} is {result.describe()}."
            )
        worse.append(f"{int(row['rank'])}: {result.interval_text()}")
        sources = result.sources
    m = against_best(len(fitting))
    counted = f"{m} comparisons (best of {len(fitting)} ranks)" if m > 1 else "1 comparison"
    return (
        f"Sweet-spot rank: {int(best['rank'])}, the best rank (perplexity {_fmt(best['perplexity'])}); every "
        f"smaller rank is worse ({'; '.join(worse)}; {tolerance}, {counted}, {sources})."
    )


def _sweep(ranks: pd.DataFrame) -> str:
    return "ranks " + ", ".join(str(int(r)) for r in ranks["rank"])


def diminishing_finding(steps: pd.DataFrame | None, settings: FindingSettings) -> str | None:
    """Returns diminish above r when every step above r is shown not worth it and the step into r was."""
    if steps is None:
        return None
    comparisons: list[Comparison | None] = steps.attrs.get("comparisons", [])
    if not comparisons or any(c is None for c in comparisons):
        return _unjudged("Diminishing returns")
    verdicts = [c.verdict for c in comparisons]
    listed = "; ".join(f"{s}: {c.interval_text()} {c.verdict.value}" for s, c in zip(steps["step"], comparisons,
                                                                                   strict=True))  # fmt: skip
    counted = f"{len(steps)} steps compared" if len(steps) > 1 else "1 step"

    def rests_on(comparison: Comparison) -> str:
        # The noise sources of the step the conclusion rests on (steps may differ; the table has each).
        return f"tolerance {settings.min_relative_gain:.0%}, {counted}, {comparison.sources}"

    if verdicts[-1] is Verdict.BETTER:
        return (f"Returns had not diminished by the largest rank tried: the step {steps['step'].iloc[-1]} is still "
                f"better ({listed}; {rests_on(comparisons[-1])}).")  # fmt: skip
    worth = [k for k, v in enumerate(verdicts) if v is Verdict.BETTER]
    first_after = (worth[-1] + 1) if worth else 0
    tail = comparisons[first_after:]
    knee = int(steps["from_rank"].iloc[first_after])
    undecided = [c for c in tail if c.verdict is Verdict.INCONCLUSIVE]
    if not undecided:
        return (f"Returns diminish above rank {knee}: every later rank step is shown to change perplexity by less "
                f"than {settings.min_relative_gain:.0%} or to hurt ({listed}; {rests_on(tail[0])}).")  # fmt: skip
    return (f"Diminishing returns: inconclusive above rank {knee} ({listed}; {rests_on(undecided[0])}); "
            f"{undecided[0].settle}.")  # fmt: skip


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
        return _unjudged("Target modules")
    conclusion = {
        Verdict.EQUIVALENT: "attention-only targeting is enough here",
        Verdict.BETTER: "the MLP layers add quality that attention-only targeting misses",
        Verdict.WORSE: "adding the MLP layers makes it worse",
        Verdict.INCONCLUSIVE: "inconclusive whether the MLP layers are worth adding",
    }[result.verdict]
    return (
        f"Target modules: {conclusion}. Adding the MLP ({best_mlp['modules']}, perplexity "
        f"{_fmt(best_mlp['perplexity'])}) against the best attention-only set ({best_attention['modules']}, "
        f"{_fmt(best_attention['perplexity'])}) for {params_ratio:.1f}x the trainable parameters: {result.describe()}."
    )


def _memory_change_text(saved_pct: float) -> str:
    if saved_pct >= 0:
        return f"{saved_pct:.0f}% less peak memory than the unquantized run"
    return f"{-saved_pct:.0f}% more peak memory than the unquantized run"


def quantization_findings(
    quant: pd.DataFrame | None, judge: Judge, settings: FindingSettings, memory_text: str = "peak memory"
) -> list[str]:
    """Each weight format against the best one, at tolerance sweet_spot_tolerance."""
    if quant is None:
        return []
    fitting = quant.dropna(subset=["perplexity"])
    best = fitting.loc[fitting["perplexity"].idxmin()] if len(fitting) else None
    sentences = []
    for _, row in fitting.iterrows():
        saved = (
            f", {_memory_change_text(row['memory_saved_pct'])}"
            if pd.notna(row["memory_saved_pct"]) and row["quantization"] not in UNQUANTIZED
            else ""
        )
        if row["quantization"] == best["quantization"]:
            against = "the best format"
        else:
            result = judge.compare(row["run_id"], best["run_id"], "perplexity", settings.sweet_spot_tolerance,
                                   against_best(len(fitting)))  # fmt: skip
            verdict = result.describe() if result else "not judged"
            against = f"against {best['quantization']}: {verdict}"
        sentences.append(
            f"Quantization {row['quantization']}: perplexity {_fmt(row['perplexity'])} ({against}), "
            f"peak memory {row['peak_memory_gb']:.2f} GB ({memory_text}){saved}."
        )
    for _, row in quant[quant["status"] != "ok"].iterrows():
        sentences.append(f"Quantization {row['quantization']}: {row['status']}.")
    return sentences


def pareto_finding(front: pd.DataFrame | None, x: str, axis_name: str, unit: str) -> str | None:
    if front is None or front.empty:
        return None
    listed = "; ".join(
        f"{r['run_id']} ({r[x]:.3g} {unit}, perplexity {_fmt(r['perplexity'])})" for _, r in front.iterrows()
    )
    return f"Pareto-optimal on {axis_name} and perplexity ({len(front)} run{'s' if len(front) != 1 else ''}): {listed}."


def decision_findings(decisions: pd.DataFrame | None, memory_text: str) -> list[str]:
    """One sentence per distinct recommendation; consecutive budgets with the same pick share it."""
    if decisions is None:
        return []
    sentences = []
    for basis, group in decisions.groupby("memory", sort=False):
        rows = list(group.to_dict("records"))
        label = memory_text if basis == "measured" else "predicted GPU memory (planner)"
        start = 0
        for end in range(len(rows)):
            same = ("run_id", "best_run_id")  # one sentence while the pick and the reason stay the same
            if end + 1 < len(rows) and all(rows[end + 1].get(k) == rows[start].get(k) for k in same):
                continue
            first, last, row = rows[start]["budget_gb"], rows[end]["budget_gb"], rows[start]
            budget = f"Budget {first:g} GB" if first == last else f"Budgets {first:g}-{last:g} GB"
            if basis != "measured":
                budget += " (predicted GPU memory)"
            if row["run_id"] == "nothing fits":
                sentences.append(f"{budget}: nothing fits.")
            else:
                choice = (f"{row['run_id']} (perplexity {_fmt(row['perplexity'])}, {row['memory_gb']:.2f} GB "
                          f"{label})")  # fmt: skip
                best = row["best_run_id"]
                why = ("the best that fits" if row["run_id"] == best
                       else f"the cheapest run equivalent to the best that fits, {best}: {row['vs_best']}")  # fmt: skip
                undecided = (f"; cheaper {row['cheaper_inconclusive']} inconclusive against it"
                             if row.get("cheaper_inconclusive") else "")  # fmt: skip
                sentences.append(f"{budget}: {choice}, {why}{undecided}.")
            start = end + 1
    return sentences


def noise_finding(trained: pd.DataFrame, judge: Judge) -> str:
    """What the verdicts' noise rests on: said once, near the top of the findings."""
    rows = max((e.nll.shape[1] for e in judge.evidence.values()), default=0)
    replicated = trained[trained["n"] >= 2] if "n" in trained else trained.iloc[0:0]
    pool = judge.pool("perplexity")
    if replicated.empty or pool is None:
        return (
            f"Noise: one seed per configuration and no replicates, so single-seed verdicts describe the trained "
            f"adapters, not the configurations: they cover evaluation noise only (which {rows} validation rows were "
            "drawn), not what another seed would have trained (set sweep.noise_replicates: 3 to replicate the centre "
            "configuration, or sweep.seeds to replicate every one)."
        )
    spread = replicated["perplexity_std"].dropna()
    spread_text = (f"the standard deviation of perplexity across seeds is {spread.median():.3g}"
                   + (f" (median over configurations, max {spread.max():.3g})" if len(spread) > 1 else ""))  # fmt: skip
    if len(replicated) == len(trained):
        seeds = int(trained["n"].max())
        return (f"Noise: {seeds} seeds per configuration and {rows} validation rows; {spread_text}; verdicts cover "
                "both sources and say which dominates.")  # fmt: skip
    listed = ", ".join(f"{row.run_id} ({int(row.n)} seeds)" for row in replicated.itertuples())
    return (
        f"Noise: training noise measured on replicates of {listed}: {spread_text}; every one-seed configuration's "
        f"verdicts borrow this {pool.describe()} ({pool.seed_df} df) besides the evaluation noise of {rows} "
        "validation rows, so they describe the configurations, not only the trained adapters; each verdict names "
        "the noise it rests on."
    )


def all_tables(table: pd.DataFrame, settings: FindingSettings, judge: Judge | None = None) -> dict[str, pd.DataFrame]:
    """Every derived table the study supports, by name (missing axes are skipped)."""
    judge = judge or Judge({})
    runs = prepare(table)
    tables: dict[str, Any] = {
        "rank": rank_table(runs),
        "modules": module_table(runs),
        "quantization": quantization_table(runs),
        "base_quantization": base_quantization_table(runs),
        "diminishing_returns": diminishing_returns_table(runs, judge, settings),
        "time_memory": time_memory_table(runs),
        "pareto_memory": pareto_table(runs, "peak_memory_gb"),
        "pareto_time": pareto_table(runs, "train_wall_s"),
        "decision": decision_table(runs, settings.memory_budgets_gb, judge, settings),
        "memory_plan": memory_plan_table(runs),
    }
    for name in ("rank", "modules", "quantization"):
        if tables[name] is not None:
            tables[name] = with_own_intervals(tables[name], judge)
    return {name: frame for name, frame in tables.items() if frame is not None}


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


def headline_findings(
    table: pd.DataFrame,
    settings: FindingSettings,
    judge: Judge | None = None,
    tables: dict[str, pd.DataFrame] | None = None,
) -> list[str]:
    """The report's headline sentences, each computed from the measured numbers.

    `tables`: all_tables' result when the caller has it already (its verdicts are not recomputed).
    """
    judge = judge or Judge({})
    runs = prepare(table)
    tables = tables if tables is not None else all_tables(table, settings, judge)
    memory_text = "CPU RSS" if "CPU" in memory_label(runs) else "GPU memory"
    trained = trained_runs(runs)
    sentences: list[str | None] = [*precision_warnings(runs), noise_finding(trained, judge)]
    if trained["fits"].any():
        best = trained[trained["fits"]].sort_values("perplexity").iloc[0]
        base = best["base_perplexity"]
        start = f"from {_fmt(base)} (the base model in {best['quant_label']}, no adapter) " if pd.notna(base) else ""
        best_ppl = _fmt(best["perplexity"])
        sentences.append(f"Best run: {best['run_id']} lowers validation perplexity {start}to {best_ppl}.")
    sentences += [
        sweet_spot_finding(tables.get("rank"), judge, settings, memory_text),
        diminishing_finding(tables.get("diminishing_returns"), settings),
        attention_finding(tables.get("modules"), judge, settings),
        *quantization_findings(tables.get("quantization"), judge, settings, memory_text),
        base_quantization_finding(tables.get("base_quantization"), judge, settings),
        pareto_finding(tables.get("pareto_memory"), "peak_memory_gb", f"peak memory ({memory_text})", "GB"),
        pareto_finding(tables.get("pareto_time"), "train_wall_s", "training time", "s"),
        *decision_findings(tables.get("decision"), memory_text),
        memory_plan_finding(tables.get("memory_plan")),
    ]
    not_fitting = trained[~trained["fits"]]
    if len(not_fitting):
        listed = [f"{row.run_id} {status_label(row.status)}" for row in not_fitting.itertuples()]
        sentences.append("Not measured: " + "; ".join(listed) + ".")
    return [s for s in sentences if s]
