"""Comparing two configurations: an interval for their difference and one of four verdicts.

Every configuration is scored on the same validation rows, so two of them
are compared pairwise over those rows (evaluation noise: which rows happened
to be in the validation split) and, when they have several seeds, across
seeds (seed noise: what training happened to learn). Both go into one
interval for the relative change of the candidate against the reference:

- perplexity: change = perplexity ratio - 1 (negative is better), computed on
  the log scale (log perplexity is the token-weighted mean NLL);
- accuracy: change = difference of exact-match accuracy (positive is better).

With tolerance t for the sentence at hand, the verdict is *equivalent* when
the equivalence interval lies inside (-t, +t) (two one-sided tests, TOST);
otherwise *better* or *worse* when the difference interval excludes zero;
otherwise *inconclusive*. Equivalence is checked first, so a detectable but
negligible difference reads as equivalent. A sentence that rests on m
comparisons (the best of several candidates) widens every interval by
Bonferroni's correction (level 1 - alpha/m), so the verdicts and the intervals
printed beside them always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import pandas as pd

ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: a rerun of the findings prints the same intervals


class Verdict(StrEnum):
    BETTER = "better"
    WORSE = "worse"
    EQUIVALENT = "equivalent"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Evidence:
    """One configuration's per-example evaluation, one row per seed.

    nll: summed response NLL per validation row, shape (seeds, rows);
    tokens: response tokens per row, shape (rows,) (the same rows for every run);
    correct: exact-match hits per scored prompt, shape (seeds, prompts), or None.
    """

    nll: np.ndarray
    tokens: np.ndarray
    correct: np.ndarray | None = None

    @property
    def seeds(self) -> int:
        return int(self.nll.shape[0])

    def log_perplexity(self) -> np.ndarray:
        """Per seed: token-weighted mean NLL (log perplexity)."""
        return self.nll.sum(axis=1) / self.tokens.sum()

    def accuracy(self) -> np.ndarray:
        assert self.correct is not None
        return self.correct.mean(axis=1)


@dataclass(frozen=True)
class Comparison:
    """A candidate against a reference on one metric, with its verdict."""

    metric: str
    change: float  # perplexity: ratio - 1; accuracy: difference
    low: float  # difference interval, level 1 - alpha/m
    high: float
    eq_low: float  # equivalence (TOST) interval, level 1 - 2 alpha/m
    eq_high: float
    tolerance: float
    comparisons: int
    se_eval: float  # standard error from evaluation rows (paired bootstrap), log scale for perplexity
    se_seed: float  # standard error from seeds (NaN with one seed)
    seeds: int
    examples: int
    verdict: Verdict
    settle: str = ""  # for an inconclusive verdict: what would settle it

    @property
    def sources(self) -> str:
        """Which noise the interval covers, and which dominates."""
        if not math.isfinite(self.se_seed):
            return "evaluation noise only"
        dominant = "seed" if self.se_seed > self.se_eval else "evaluation"
        return f"seeds and evaluation rows ({dominant} noise dominates)"

    def interval_text(self) -> str:
        """The change and the interval its verdict rests on: the equivalence interval for an equivalent
        verdict, the difference interval otherwise, with its confidence level."""
        scale, unit = (100, "%") if self.metric == "perplexity" else (100, " pts")
        low, high = (self.eq_low, self.eq_high) if self.verdict is Verdict.EQUIVALENT else (self.low, self.high)
        level = 1 - (2 if self.verdict is Verdict.EQUIVALENT else 1) * ALPHA / self.comparisons
        return f"{scale * self.change:+.1f}{unit} [{scale * low:+.1f}, {scale * high:+.1f}] ({level:.1%} interval)"

    def describe(self) -> str:
        """'equivalent (+0.8% [-0.9, +2.5] (90.0% interval), tolerance 2%, evaluation noise only)'."""
        correction = f", {self.comparisons} comparisons" if self.comparisons > 1 else ""
        interval = f"{self.interval_text()}, tolerance {self.tolerance:.0%}{correction}, {self.sources}"
        text = f"{self.verdict.value} ({interval})"
        return text + (f"; {self.settle}" if self.settle else "")


def _quantiles(comparisons: int, seed_df: float) -> tuple[float, float]:
    """(difference, equivalence) critical values at Bonferroni-corrected levels.

    Normal quantiles with evaluation noise only; with seeds, Student's t on the
    seed part's Welch degrees of freedom (conservative: the row part adds more).
    """
    from scipy import stats

    alpha = ALPHA / comparisons
    if math.isfinite(seed_df):
        return float(stats.t.ppf(1 - alpha / 2, seed_df)), float(stats.t.ppf(1 - alpha, seed_df))
    return float(stats.norm.ppf(1 - alpha / 2)), float(stats.norm.ppf(1 - alpha))


def classify(
    low: float, high: float, eq_low: float, eq_high: float, tolerance: float, lower_is_better: bool
) -> Verdict:
    """The verdict from the two intervals: equivalent first, then better/worse, else inconclusive."""
    if -tolerance < eq_low and eq_high < tolerance:
        return Verdict.EQUIVALENT
    if high < 0 or low > 0:
        improved = (high < 0) == lower_is_better
        return Verdict.BETTER if improved else Verdict.WORSE
    return Verdict.INCONCLUSIVE


def paired_bootstrap_se(candidate: np.ndarray, reference: np.ndarray, weights: np.ndarray | None) -> float:
    """Standard error of (sum c / sum w) - (sum r / sum w) over rows resampled with replacement, paired.

    Without weights, the statistic is the difference of means (accuracy).
    """
    from scipy import stats

    if len(candidate) < 2:
        return float("nan")
    w = np.ones_like(candidate, dtype=float) if weights is None else weights.astype(float)

    def statistic(c, r, w_, axis=-1):
        return (c.sum(axis=axis) - r.sum(axis=axis)) / w_.sum(axis=axis)

    result = stats.bootstrap(
        (candidate.astype(float), reference.astype(float), w),
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        random_state=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return float(result.standard_error)


def _seed_part(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(standard error, Welch degrees of freedom) of the difference of seed means; NaN without replicates."""
    n_c, n_r = len(candidate), len(reference)
    if n_c < 2 or n_r < 2:
        return float("nan"), float("nan")
    v_c, v_r = candidate.var(ddof=1) / n_c, reference.var(ddof=1) / n_r
    se = math.sqrt(v_c + v_r)
    if se == 0:
        return 0.0, float("inf")
    df = (v_c + v_r) ** 2 / (v_c**2 / (n_c - 1) + v_r**2 / (n_r - 1))
    return se, df


def compare(
    candidate: Evidence,
    reference: Evidence,
    metric: str,
    tolerance: float,
    comparisons: int = 1,
) -> Comparison:
    """The candidate against the reference on `metric` ("perplexity" or "accuracy")."""
    if metric == "perplexity":
        per_seed_c, per_seed_r = candidate.log_perplexity(), reference.log_perplexity()
        rows_c, rows_r, weights = candidate.nll.mean(axis=0), reference.nll.mean(axis=0), candidate.tokens
    else:
        assert candidate.correct is not None and reference.correct is not None
        per_seed_c, per_seed_r = candidate.accuracy(), reference.accuracy()
        rows_c, rows_r, weights = candidate.correct.mean(axis=0), reference.correct.mean(axis=0), None
    estimate = float(per_seed_c.mean() - per_seed_r.mean())
    se_eval = paired_bootstrap_se(rows_c, rows_r, weights)
    se_seed, seed_df = _seed_part(per_seed_c, per_seed_r)
    se = math.sqrt(se_eval**2 + (se_seed**2 if math.isfinite(se_seed) else 0.0))
    q_diff, q_eq = _quantiles(comparisons, seed_df)
    to_change = (lambda x: math.expm1(x)) if metric == "perplexity" else (lambda x: x)
    bounds = [to_change(estimate + sign * q * se) for q in (q_diff, q_eq) for sign in (-1, 1)]
    low, high, eq_low, eq_high = bounds
    verdict = classify(low, high, eq_low, eq_high, tolerance, lower_is_better=metric == "perplexity")
    comparison = Comparison(
        metric, to_change(estimate), low, high, eq_low, eq_high, tolerance, comparisons,
        se_eval, se_seed, min(candidate.seeds, reference.seeds), len(rows_c), verdict,
    )  # fmt: skip
    if verdict is Verdict.INCONCLUSIVE:
        comparison = _with_settle(comparison, estimate, se, q_diff, q_eq, metric)
    return comparison


def _with_settle(comparison: Comparison, estimate: float, se: float, q_diff: float, q_eq: float, metric: str):
    """Roughly how many seeds (or validation rows) would make the interval decide.

    The interval must shrink until it excludes zero (|d| > q se) or fits inside
    the tolerance (|d| + q se < t); its width falls as 1/sqrt(n) of the noise
    source that dominates.
    """
    from dataclasses import replace

    tolerance = math.log1p(comparison.tolerance) if metric == "perplexity" else comparison.tolerance
    targets = [abs(estimate) / q_diff]
    if abs(estimate) < tolerance:
        targets.append((tolerance - abs(estimate)) / q_eq)
    needed = max(targets)
    if needed <= 0 or se <= 0:
        return comparison
    factor = (se / needed) ** 2
    seed_dominates = math.isfinite(comparison.se_seed) and comparison.se_seed > comparison.se_eval
    if seed_dominates:
        text = f"roughly {math.ceil(comparison.seeds * factor)} seeds per configuration would settle it"
    else:
        text = f"roughly {math.ceil(comparison.examples * factor)} validation rows would settle it"
        if not math.isfinite(comparison.se_seed):
            text += " (seed noise, not measured with one seed, may need more)"
    return replace(comparison, settle=text)


def evidence_from_examples(examples: pd.DataFrame) -> dict[str, Evidence]:
    """Per configuration (config_id), its seeds' per-row scores from results/tables/examples.csv."""
    evidence = {}
    for config_id, group in examples.groupby("config_id", sort=False):
        runs = [run.sort_values("row") for _, run in group.groupby("run_id", sort=True)]
        if not runs or any(run.empty for run in runs) or len({len(run) for run in runs}) != 1:
            continue
        correct = [pd.to_numeric(run["correct"], errors="coerce").dropna().to_numpy() for run in runs]
        evidence[str(config_id)] = Evidence(
            nll=np.stack([run["nll"].to_numpy(dtype=float) for run in runs]),
            tokens=runs[0]["tokens"].to_numpy(dtype=float),
            correct=np.stack(correct) if correct[0].size else None,
        )
    return evidence


def own_interval(evidence: Evidence, metric: str = "perplexity") -> tuple[float, float]:
    """95 % interval of one configuration's own metric, for error bars.

    Perplexity: normal on the log scale, rows resampled plus the seeds' spread. Accuracy, a proportion of
    prompts: the Wilson score interval of the pooled hits (inside [0, 1], and not empty at 0 or all hits,
    where a resampled standard error is zero), each side widened by the seeds' spread in quadrature.
    """
    from scipy import stats

    z = float(stats.norm.ppf(1 - ALPHA / 2))
    if metric == "perplexity":
        per_seed = evidence.log_perplexity()
    elif evidence.correct is None:
        return float("nan"), float("nan")
    else:
        per_seed = evidence.accuracy()
    se_seed = per_seed.std(ddof=1) / math.sqrt(len(per_seed)) if len(per_seed) > 1 else 0.0
    centre = float(per_seed.mean())
    if metric == "perplexity":
        rows, weights = evidence.nll.mean(axis=0), evidence.tokens
        se_eval = paired_bootstrap_se(rows, np.zeros_like(rows), weights)  # reference 0: the metric itself
        se = math.sqrt((se_eval if math.isfinite(se_eval) else 0.0) ** 2 + se_seed**2)
        return math.exp(centre - z * se), math.exp(centre + z * se)
    assert evidence.correct is not None
    prompts = evidence.correct.shape[1]
    wilson = stats.binomtest(round(centre * prompts), prompts).proportion_ci(1 - ALPHA, method="wilson")
    low = centre - math.hypot(centre - wilson.low, z * se_seed)
    high = centre + math.hypot(wilson.high - centre, z * se_seed)
    return max(low, 0.0), min(high, 1.0)


@dataclass
class Judge:
    """Compares configurations by id; None where a configuration has no per-row scores."""

    evidence: dict[str, Evidence]

    def compare(
        self, candidate: str, reference: str, metric: str, tolerance: float, comparisons: int = 1
    ) -> Comparison | None:
        if candidate not in self.evidence or reference not in self.evidence:
            return None
        a, b = self.evidence[candidate], self.evidence[reference]
        if metric == "accuracy" and (a.correct is None or b.correct is None):
            return None
        return compare(a, b, metric, tolerance, max(1, comparisons))
