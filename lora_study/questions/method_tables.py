"""The method axis in the report: LoRA variants side by side, the share of full fine-tuning's improvement
each run recovers, and adapter anatomy (how much of its rank each update uses)."""

from __future__ import annotations

import pandas as pd

from lora_study.questions.findings import (
    FindingSettings,
    _fmt,
    _measured,
    _reference_row,
    _status,
    _training_columns,
    _with_accuracy,
    _with_verdicts,
    baselines,
    partial_coverage,
    trained_runs,
)
from lora_study.stats.verdicts import Judge
from lora_study.study.methods import ENERGY_SHARE, FULL, LORA, lora_scale

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


def methods_table(runs: pd.DataFrame, judge: Judge, settings: FindingSettings) -> pd.DataFrame | None:
    """LoRA variants side by side: one block per rank, targets, format and training settings holding two or
    more methods, each variant against the block's plain LoRA run (tolerance min_relative_gain; m = the
    block's variants). A variant trained with its own settings (methods.<method>) forms its own block."""
    trained = trained_runs(runs)
    adapters = trained[trained["method"] != FULL]
    keys = ["rank", "modules_label", "quant_label", *_training_columns(adapters)]
    blocks = [group for _, group in adapters.groupby(keys, dropna=False, sort=False) if group["method"].nunique() > 1]
    if not blocks:
        return None
    group = pd.concat(blocks)
    table = pd.DataFrame(
        {
            "run_id": group["run_id"],
            "method": group["method"],
            "rank": group["rank"],
            "alpha": group["alpha"],
            "scale": [
                lora_scale(m, a, r) for m, a, r in zip(group["method"], group["alpha"], group["rank"], strict=True)
            ],
            "modules": group["modules_label"],
            "quantization": group["quant_label"],
            **_measured(group, "perplexity", "accuracy", "peak_memory_gb", "train_wall_s"),
            "trainable_params": group["trainable_params"].astype("Int64"),
            "adapter_params": group["adapter_params"].astype("Int64") if "adapter_params" in group else pd.NA,
            "status": _status(group),
        }
    ).reset_index(drop=True)
    table = table[_with_accuracy(list(table.columns), table)]
    references, comparisons = [], []
    for block in blocks:
        lora = block[block["method"] == LORA]
        reference = lora.iloc[0]["run_id"] if len(lora) else ""
        variants = (block["method"] != LORA).sum()
        for run_id, method in zip(block["run_id"], block["method"], strict=True):
            compared = bool(reference) and method != LORA
            references.append(reference if compared else "")
            comparisons.append(
                judge.compare(run_id, reference, "perplexity", settings.min_relative_gain, variants)
                if compared
                else None
            )
    table.insert(1, "compared_with", references)
    return _with_verdicts(table, comparisons)


def full_reference(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series] | None:
    """(best fitting full fine-tuning run, the unquantized base model), or None without both."""
    trained = trained_runs(runs)
    full = trained[(trained["method"] == FULL) & trained["fits"]].dropna(subset=["perplexity"])
    base = _reference_row(baselines(runs).dropna(subset=["perplexity"]))
    if full.empty or base is None:
        return None
    return full.sort_values("perplexity").iloc[0], base


def full_share_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """Per adapter run: the share of full fine-tuning's improvement it recovers, against the unquantized base,
    and its memory and time relative to full fine-tuning."""
    reference = full_reference(runs)
    if reference is None:
        return None
    full, base = reference
    trained = trained_runs(runs)
    adapters = trained[trained["method"] != FULL]
    if adapters.empty:
        return None
    gain = base["perplexity"] - full["perplexity"]
    table = pd.DataFrame(
        {
            "run_id": adapters["run_id"],
            "method": adapters["method"],
            **_measured(adapters, "perplexity", "accuracy"),
            # Quantized runs are measured against the unquantized base: their quantization cost counts.
            "share_of_full_pct": 100 * (base["perplexity"] - adapters["perplexity"]) / gain
            if gain > 0
            else float("nan"),
            "memory_vs_full_pct": 100 * adapters["peak_memory_gb"] / full["peak_memory_gb"],
            "time_vs_full_pct": 100 * adapters["train_wall_s"] / full["train_wall_s"],
            "status": _status(adapters),
        }
    )
    accuracy_gain = full.get("accuracy", float("nan")) - base.get("accuracy", float("nan"))
    if "accuracy" in adapters and pd.notna(accuracy_gain) and accuracy_gain > 0:
        position = table.columns.get_loc("share_of_full_pct") + 1
        table.insert(
            position, "accuracy_share_of_full_pct", 100 * (adapters["accuracy"] - base["accuracy"]) / accuracy_gain
        )
    table = table[_with_accuracy(list(table.columns), table)]
    table.loc[~adapters["fits"].to_numpy(), ["share_of_full_pct", "memory_vs_full_pct", "time_vs_full_pct"]] = float(
        "nan"
    )
    table.attrs.update(full_id=full["run_id"], base_id=base["run_id"], full_perplexity=full["perplexity"],
                       base_perplexity=base["perplexity"])  # fmt: skip
    return table.sort_values("share_of_full_pct", ascending=False, na_position="last").reset_index(drop=True)


def full_share_finding(
    runs: pd.DataFrame, table: pd.DataFrame | None, judge: Judge, settings: FindingSettings
) -> str | None:
    reference = full_reference(runs)
    if reference is None:
        return None
    full, base = reference
    start = (
        f"Full fine-tuning ({full['run_id']}, learning rate {full['training.learning_rate']:g}) moves perplexity from "
        f"{_fmt(base['perplexity'])} ({base['run_id']}) to {_fmt(full['perplexity'])}"
    )
    if base["perplexity"] <= full["perplexity"]:
        return f"{start}: no improvement, so no run's share of it is defined."
    if table is None or table["share_of_full_pct"].isna().all():
        return f"{start}."
    best = table.dropna(subset=["share_of_full_pct"]).iloc[0]
    row = runs.set_index("run_id").loc[best["run_id"]]
    # The top adapter was picked from k of them: simultaneous over the k comparisons with full fine-tuning.
    adapters = int(table["share_of_full_pct"].notna().sum())
    comparison = judge.compare(best["run_id"], full["run_id"], "perplexity", settings.sweet_spot_tolerance, adapters)
    verdict = f"; against full fine-tuning it is {comparison.describe()}" if comparison else ""
    return (
        f"{start}. The adapter run recovering most of that improvement, {best['run_id']}, recovers "
        f"{best['share_of_full_pct']:.0f}% of it (perplexity {_fmt(best['perplexity'])}) at "
        f"{best['memory_vs_full_pct']:.0f}% of full fine-tuning's peak memory and {best['time_vs_full_pct']:.0f}% "
        f"of its training time, training {100 * row['trainable_params'] / full['trainable_params']:.2g}% as many "
        f"parameters{verdict}."
    )


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


def methods_finding(table: pd.DataFrame | None) -> str | None:
    """Per block, each variant against plain LoRA at the same rank, targets, format and settings."""
    if table is None:
        return None
    by_id = table.set_index("run_id")
    sentences = []
    for reference, rows in table.groupby("compared_with", sort=False):
        comparisons = table.attrs["comparisons"]
        judged = [(row, comparisons[i]) for i, row in rows.iterrows() if comparisons[i] is not None]
        if not reference or not judged:
            continue
        lora = by_id.loc[reference]
        parts = [f"{row['method']} {_fmt(row['perplexity'])}: {c.describe()}" for row, c in judged]
        sentences.append(
            f"Methods at rank {int(lora['rank'])}, {lora['modules']}, {lora['quantization']} against plain LoRA "
            f"({reference}, perplexity {_fmt(lora['perplexity'])}): " + "; ".join(parts) + "."
        )
    return " ".join(sentences) or None


def method_tables(
    runs: pd.DataFrame, judge: Judge, settings: FindingSettings, layers: pd.DataFrame | None
) -> dict[str, pd.DataFrame]:
    tables = {
        "methods": methods_table(runs, judge, settings),
        "full_finetuning": full_share_table(runs),
        "anatomy": anatomy_table(runs, layers),
    }
    return {name: table for name, table in tables.items() if table is not None}


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
