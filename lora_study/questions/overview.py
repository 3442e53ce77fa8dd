"""The study at a glance: how the runs computed, the noise every verdict rests on, and the best run."""

from __future__ import annotations

import pandas as pd

from lora_study.analysis.runs import (
    trained_runs,
)
from lora_study.questions.common import (
    sig,
)
from lora_study.report.question import Question, Study
from lora_study.stats.verdicts import (
    ALPHA,
    SEED_BOUND,
    Judge,
)


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


def best_run_finding(study: Study) -> str | None:
    trained = trained_runs(study.runs)
    if not trained["fits"].any():
        return None
    best = trained[trained["fits"]].sort_values("perplexity").iloc[0]
    base = best["base_perplexity"]
    start = f"from {sig(base)} (the base model in {best['quant_label']}, no adapter) " if pd.notna(base) else ""
    return f"Best run: {best['run_id']} lowers validation perplexity {start}to {sig(best['perplexity'])}."


def findings(study: Study) -> list[str | None]:
    return [
        *precision_warnings(study.runs),
        noise_finding(trained_runs(study.runs), study.judge),
        best_run_finding(study),
    ]


QUESTION = Question(
    anchor="overview",
    title="Overview",
    findings=findings,
    definitions={
        "perplexity": "exp of the token-weighted mean negative log-likelihood over the response tokens "
        "of the validation split.",
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
        "noise": "metrics of a configuration with seeds are means over them, _ci95 the half-width of their 95 % "
        "t-interval; perplexity_low/high are each configuration's own 95 % interval (rows plus its seed part, own or "
        "pooled, t on the Welch-Satterthwaite df), drawn as error bars; accuracy_low/high a Wilson score interval on "
        "the effective number of prompts (p(1-p) / the same two-source variance), within 0 and 1 and not empty at 0 "
        "hits. Error bars answer 'where is this configuration'; whether two differ is the paired comparison of the "
        "verdicts (the comparison chart), which is much narrower when rows and seeds are shared.",
    },
)
