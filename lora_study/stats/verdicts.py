"""Comparing two configurations: an interval for their difference and one of four verdicts.

Every configuration is scored on the same validation rows; a trained one may
have several seeds. One variance model covers both noise sources, per
configuration c, seed s and row i (on the scale the metric averages over):

    y[c, s, i] = mu[c] + row[c, i] + seed[c, s] + interaction[c, s, i]

- perplexity: change = perplexity ratio - 1 (negative is better), computed on the
  log scale; log perplexity is a ratio (summed NLL / summed tokens), linearised
  per row so that it is a plain mean over rows;
- accuracy: change = difference of exact-match accuracy (positive is better).

The variance of a difference of means has a row part (paired over the shared
rows: the spread of the per-row differences, which holds the interaction once)
and a seed part (the seed effects alone: the spread of per-seed means minus the
interaction the row part already counts, from a two-way ANOVA of each seeds x
rows table). Configurations that share seeds (same data order, same
initialisation noise) are paired by seed. A trained configuration with one seed
borrows the seed variance pooled over every configuration with two or more
(replicated centre points); the base model, which is not trained, has no seed
part. Degrees of freedom: Welch-Satterthwaite over all terms.

With tolerance t for the sentence at hand, the verdict is *equivalent* when
the equivalence interval lies inside (-t, +t) (two one-sided tests, TOST);
otherwise *better* or *worse* when the difference interval excludes zero;
otherwise *inconclusive*. Equivalence is checked first, so a detectable but
negligible difference reads as equivalent (and says it is real). A sentence
that rests on m comparisons widens every interval by Bonferroni's correction
(level 1 - alpha/m); a sentence that picks the best of k candidates by point
estimate and compares the others with it rests on every pair of them
(`against_best`), since the data chose which pairs are shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np
import pandas as pd

ALPHA = 0.05
METRICS = ("perplexity", "accuracy")
# "Would settle it" looks this far (seeds per configuration; multiples of the validation rows).
MAX_SEEDS = 1000
MAX_ROW_FACTOR = 1_000_000
# The seed part's degrees of freedom are computed at its upper bound of this confidence (Noise.total).
SEED_BOUND = 0.7


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
    correct: exact-match hits per scored prompt, shape (seeds, prompts), or None;
    seed_ids: each run's training seed, in nll's order (empty when unknown: never paired);
    trained: False for the base model, whose evaluation has no training noise (and for two forms of one
        trained adapter, which share its training noise).
    """

    nll: np.ndarray
    tokens: np.ndarray
    correct: np.ndarray | None = None
    seed_ids: tuple[int, ...] = ()
    trained: bool = True

    @property
    def seeds(self) -> int:
        return int(self.nll.shape[0])

    def log_perplexity(self) -> np.ndarray:
        """Per seed: token-weighted mean NLL (log perplexity)."""
        return self.nll.sum(axis=1) / self.tokens.sum()

    def accuracy(self) -> np.ndarray:
        assert self.correct is not None
        return self.correct.mean(axis=1)

    def scores(self, metric: str) -> np.ndarray:
        """Seeds x rows values whose row mean is the metric of each seed.

        Log perplexity sum(nll) / sum(w) is linearised per row (delta method):
        (nll_i - M w_i) / mean(w) + M, whose mean over rows is M exactly and whose
        spread over rows is the ratio's resampling spread.
        """
        if metric == "accuracy":
            assert self.correct is not None
            return self.correct.astype(float)
        per_seed = self.log_perplexity()[:, None]
        weights = self.tokens.astype(float)[None, :]
        return (self.nll - per_seed * weights) / weights.mean() + per_seed


@dataclass(frozen=True)
class Term:
    """One signed variance component with its degrees of freedom (inf: known exactly)."""

    value: float
    df: float


def satterthwaite(terms: list[Term]) -> tuple[float, float]:
    """(variance, Welch-Satterthwaite degrees of freedom) of a sum of components."""
    variance = sum(t.value for t in terms)
    denominator = sum(t.value**2 / t.df for t in terms if math.isfinite(t.df) and t.df > 0)
    if variance <= 0:
        return 0.0, math.inf
    return variance, (variance**2 / denominator if denominator > 0 else math.inf)


@dataclass(frozen=True)
class TwoWay:
    """Mean squares of a seeds x rows table (two-way ANOVA, one value per cell)."""

    seeds: int
    rows: int
    ms_seed: float  # rows x variance of the seed means: E = rows * var(seed) + var(interaction)
    ms_inter: float  # residual: E = var(interaction)

    @classmethod
    def of(cls, table: np.ndarray) -> TwoWay:
        seeds, rows = table.shape
        seed_means, row_means, grand = table.mean(axis=1), table.mean(axis=0), table.mean()
        ms_seed = rows * float(((seed_means - grand) ** 2).sum()) / (seeds - 1)
        residual = table - seed_means[:, None] - row_means[None, :] + grand
        ms_inter = float((residual**2).sum()) / ((seeds - 1) * (rows - 1))
        return cls(seeds, rows, ms_seed, ms_inter)

    def split(self, scale: float) -> tuple[Term, Term]:
        """(seed term, interaction correction) x scale, see `seed_split`."""
        return seed_split(self.ms_seed, self.ms_inter, self.seeds - 1, (self.seeds - 1) * (self.rows - 1),
                          self.rows, scale)  # fmt: skip


def seed_split(ms_seed: float, ms_inter: float, seed_df: float, inter_df: float, rows: int, scale: float):
    """The seed part of a mean's variance, scale x MS_seed / rows (the spread of the per-seed means, df
    seeds - 1), and the correction -scale x MS_interaction / rows that goes into the row part: the
    per-row differences already hold the interaction, so it is subtracted there, where the degrees of
    freedom are many, rather than from the seed part, whose few degrees of freedom it would erode."""
    return Term(scale * ms_seed / rows, seed_df), Term(-scale * ms_inter / rows, inter_df)


@dataclass(frozen=True)
class SeedPool:
    """Seed variance pooled over the configurations with two or more seeds (one metric)."""

    ms_seed: float
    ms_inter: float
    seed_df: int  # sum of (seeds - 1)
    inter_df: int
    rows: int
    sources: tuple[tuple[str, int], ...]  # (configuration, seeds)

    def split(self, scale: float) -> tuple[Term, Term]:
        return seed_split(self.ms_seed, self.ms_inter, self.seed_df, self.inter_df, self.rows, scale)

    def describe(self) -> str:
        if len(self.sources) == 1:
            config, seeds = self.sources[0]
            return f"seed noise pooled from {seeds} replicates of {config}"
        runs = sum(seeds for _, seeds in self.sources)
        return f"seed noise pooled from {len(self.sources)} replicated configurations ({runs} runs)"


def seed_pool(evidence: dict[str, Evidence], metric: str) -> SeedPool | None:
    """Pooled two-way mean squares of every trained configuration with >= 2 seeds on `metric`."""
    tables = [(name, TwoWay.of(e.scores(metric))) for name, e in evidence.items()
              if e.trained and e.seeds >= 2 and (metric == "perplexity" or e.correct is not None)]  # fmt: skip
    tables = [(name, t) for name, t in tables if t.rows >= 2]
    if not tables or len({t.rows for _, t in tables}) != 1:
        return None
    seed_df = sum(t.seeds - 1 for _, t in tables)
    inter_df = sum((t.seeds - 1) * (t.rows - 1) for _, t in tables)
    ms_seed = sum((t.seeds - 1) * t.ms_seed for _, t in tables) / seed_df
    ms_inter = sum((t.seeds - 1) * (t.rows - 1) * t.ms_inter for _, t in tables) / inter_df
    return SeedPool(ms_seed, ms_inter, seed_df, inter_df, tables[0][1].rows,
                    tuple((name, t.seeds) for name, t in tables))  # fmt: skip


def against_best(candidates: int) -> int:
    """Comparisons behind a sentence that picks the best of `candidates` by point estimate and compares
    the others with it: every pair (simultaneous intervals over the candidates), as the data chose the pairs."""
    return max(1, candidates * (candidates - 1) // 2)


@dataclass(frozen=True)
class Noise:
    """The variance of one estimate, split by source, and what the seed part rests on."""

    row_terms: list[Term]  # per-row spread, less the interaction the seed terms hold
    seed_terms: list[Term]
    basis: str  # "own", "paired", "pooled", "unmeasured" (trained, one seed, nothing to borrow), "none"
    text: str

    @property
    def row_variance(self) -> float:
        return max(0.0, sum(t.value for t in self.row_terms))

    @property
    def seed_variance(self) -> float:
        return sum(t.value for t in self.seed_terms)

    def total(self) -> tuple[float, float]:
        """(variance, Welch-Satterthwaite degrees of freedom).

        The seed part rests on few degrees of freedom (2 with three replicates), and
        Satterthwaite's df, computed from the estimates, is too high exactly when the seed
        part came out small, so the interval would be too narrow and too sure together. The
        df are therefore computed with each seed term at its upper confidence bound
        (estimate x df / chi2_df quantile SEED_BOUND): while seed noise could still
        dominate, the t quantile stays near the seed part's own.
        """
        from scipy import special

        variance, _ = satterthwaite(self.row_terms + self.seed_terms)
        bounded = [Term(t.value * t.df / float(special.chdtri(t.df, SEED_BOUND)), t.df)
                   if math.isfinite(t.df) else t for t in self.seed_terms]  # fmt: skip
        _, df = satterthwaite(self.row_terms + bounded)
        return max(variance, self.seed_variance), df


def _with_splits(row_terms: list[Term], splits: list[tuple[Term, Term]]) -> tuple[list[Term], list[Term]]:
    """(row terms with the interaction corrections, seed terms)."""
    return row_terms + [correction for _, correction in splits], [seed for seed, _ in splits]


def _row_terms(difference: np.ndarray) -> list[Term]:
    """Per-row values (seed means) -> the variance of their mean over rows."""
    rows = len(difference)
    if rows < 2:
        return [Term(0.0, math.inf)]
    return [Term(float(difference.var(ddof=1)) / rows, rows - 1)]


def _dominant(noise_rows: float, noise_seeds: float) -> str:
    return "seed" if noise_seeds > noise_rows else "evaluation"


def comparison_noise(candidate: Evidence, reference: Evidence, metric: str, pool: SeedPool | None) -> Noise:
    """The variance of (candidate - reference) on `metric` from rows and seeds, without double counting."""
    table_c, table_r = candidate.scores(metric), reference.scores(metric)
    row_terms = _row_terms(table_c.mean(axis=0) - table_r.mean(axis=0))
    trained = [side for side in (candidate, reference) if side.trained]
    if not trained:
        return Noise(row_terms, [], "none", "evaluation noise only")
    paired = (len(trained) == 2 and candidate.seeds >= 2 and candidate.seed_ids
              and candidate.seed_ids == reference.seed_ids)  # fmt: skip
    if paired:
        splits = [TwoWay.of(table_c - table_r).split(1 / candidate.seeds)]
        basis, what = "paired", f"seeds ({candidate.seeds}, paired by seed)"
    elif all(side.seeds >= 2 for side in trained):
        splits = [TwoWay.of(table).split(1 / side.seeds)
                  for side, table in ((candidate, table_c), (reference, table_r)) if side.trained]  # fmt: skip
        basis, what = "own", "seeds (" + " and ".join(str(side.seeds) for side in trained) + ")"
    elif pool is not None:
        # Borrowed seed variance, including the interaction; the row part keeps this pair's own interaction
        # (the runs may share a seed, and so their per-row noise, which the pool cannot tell): conservative.
        seed_term, _ = pool.split(sum(1 / side.seeds for side in trained))
        splits = [(seed_term, Term(0.0, math.inf))]
        basis, what = "pooled", pool.describe()
    else:
        splits = [TwoWay.of(table).split(1 / side.seeds) for side, table in ((candidate, table_c),
                  (reference, table_r)) if side.trained and side.seeds >= 2]  # fmt: skip
        # Without replicates the label stays short; the report says once, at the top, what it leaves out.
        text = ("seeds of one side and evaluation rows (the one-seed side's seed noise not measured)" if splits
                else "evaluation noise only")  # fmt: skip
        return Noise(*_with_splits(row_terms, splits), "unmeasured", text)
    noise = Noise(*_with_splits(row_terms, splits), basis, "")
    dominant = _dominant(noise.row_variance, noise.seed_variance)
    return replace(noise, text=f"evaluation rows and {what} ({dominant} noise dominates)")


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
    se_eval: float  # standard error from the rows (log scale for perplexity)
    se_seed: float  # standard error from the seeds (NaN when not measured)
    seeds: int
    examples: int
    verdict: Verdict
    settle: str = ""  # for an inconclusive verdict: what would settle it
    df: float = math.inf  # Welch-Satterthwaite degrees of freedom of the interval
    noise: str = "evaluation noise only"

    @property
    def sources(self) -> str:
        """Which noise the interval covers, and which dominates."""
        return self.noise

    @property
    def real(self) -> bool:
        """The difference interval excludes zero."""
        return self.low > 0 or self.high < 0

    @staticmethod
    def _bounds(low: float, high: float) -> str:
        return f"[{100 * low:+.1f}, {100 * high:+.1f}]"

    def _interval(self, low: float, high: float, level: float) -> str:
        unit = "%" if self.metric in ("perplexity", GENERAL) else " pts"
        return f"{100 * self.change:+.1f}{unit} {self._bounds(low, high)} ({level:.1%} interval)"

    def interval_text(self) -> str:
        """The change and the interval its verdict rests on: the equivalence interval for an equivalent
        verdict, the difference interval otherwise, with its confidence level."""
        if self.verdict is Verdict.EQUIVALENT:
            return self._interval(self.eq_low, self.eq_high, 1 - 2 * ALPHA / self.comparisons)
        return self._interval(self.low, self.high, 1 - ALPHA / self.comparisons)

    def describe(self) -> str:
        """'equivalent (+0.8% [-0.9, +2.5] (90.0% interval), tolerance 2%, evaluation noise only)'; an
        equivalent verdict whose difference interval excludes zero says the change is real but negligible."""
        correction = f", {self.comparisons} comparisons" if self.comparisons > 1 else ""
        interval = f"{self.interval_text()}, tolerance {self.tolerance:.0%}{correction}, {self.sources}"
        text = f"{self.verdict.value} ({interval})"
        if self.verdict is Verdict.EQUIVALENT and self.real:
            difference = self._interval(self.low, self.high, 1 - ALPHA / self.comparisons)
            level = 1 - 2 * ALPHA / self.comparisons
            text = (f"equivalent; a real but negligible change: {difference}, inside the tolerance "
                    f"{self.tolerance:.0%} ({level:.1%} equivalence interval {self._bounds(self.eq_low, self.eq_high)}"
                    f"{correction}, {self.sources})")  # fmt: skip
        return text + (f"; {self.settle}" if self.settle else "")


def critical_values(comparisons: int, df: float) -> tuple[float, float]:
    """(difference, equivalence) critical values at Bonferroni-corrected levels, Student's t on df."""
    from scipy import special

    alpha = ALPHA / comparisons
    if not math.isfinite(df):
        return float(special.ndtri(1 - alpha / 2)), float(special.ndtri(1 - alpha))
    return float(special.stdtrit(df, 1 - alpha / 2)), float(special.stdtrit(df, 1 - alpha))


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


def compare(
    candidate: Evidence,
    reference: Evidence,
    metric: str,
    tolerance: float,
    comparisons: int = 1,
    pool: SeedPool | None = None,
) -> Comparison:
    """The candidate against the reference on `metric` ("perplexity" or "accuracy").

    `pool`: the study's pooled seed variance, borrowed by a trained side with one seed.
    """
    if metric == "accuracy":
        assert candidate.correct is not None and reference.correct is not None
        estimate = float(candidate.accuracy().mean() - reference.accuracy().mean())
    else:
        estimate = float(candidate.log_perplexity().mean() - reference.log_perplexity().mean())
    noise = comparison_noise(candidate, reference, metric, pool)
    variance, df = noise.total()
    low, high, eq_low, eq_high, verdict = decide(estimate, math.sqrt(variance), df, metric, tolerance, comparisons)
    to_change = _ratio_change if metric == "perplexity" else (lambda x: x)
    seed_se = math.sqrt(noise.seed_variance) if noise.seed_terms else math.nan
    comparison = Comparison(
        metric, to_change(estimate), low, high, eq_low, eq_high, tolerance, comparisons,
        math.sqrt(noise.row_variance), seed_se, min(candidate.seeds, reference.seeds),
        candidate.scores(metric).shape[1], verdict, df=df, noise=noise.text,
    )  # fmt: skip
    if verdict is Verdict.INCONCLUSIVE:
        comparison = replace(comparison, settle=settle_text(comparison, estimate, noise, metric))
    return comparison


def decide(
    estimate: float, se: float, df: float, metric: str, tolerance: float, comparisons: int
) -> tuple[float, float, float, float, Verdict]:
    """(difference interval, equivalence interval, verdict) of an estimate (log ratio for perplexity) with its
    standard error and degrees of freedom, at m = `comparisons`."""
    q_diff, q_eq = critical_values(comparisons, df)
    to_change = _ratio_change if metric == "perplexity" else (lambda x: x)
    low, high, eq_low, eq_high = [to_change(estimate + sign * q * se) for q in (q_diff, q_eq) for sign in (-1, 1)]
    return low, high, eq_low, eq_high, classify(low, high, eq_low, eq_high, tolerance, metric == "perplexity")


def _ratio_change(log_ratio: float) -> float:
    """Perplexity ratio - 1 from a log ratio (capped where exp overflows: an unbounded interval)."""
    return math.expm1(min(log_ratio, 700.0))


# --- what would settle an inconclusive verdict -----------------------------------------------------------


def _decides(estimate: float, tolerance: float, variance: float, df: float, comparisons: int) -> bool:
    """Whether an interval of this variance around `estimate` would decide (exclude 0 or fit the tolerance)."""
    q_diff, q_eq = critical_values(comparisons, df)
    se = math.sqrt(variance)
    return abs(estimate) > q_diff * se or abs(estimate) + q_eq * se < tolerance


def _scaled(terms: list[Term], variance_factor: float, df_factor: float) -> list[Term]:
    return [Term(t.value * variance_factor, t.df * df_factor) for t in terms]


def _first(candidates: list[int], decides) -> int | None:
    """The first of increasing `candidates` for which `decides` holds (it stays true once true); None if none."""
    if not candidates or not decides(candidates[-1]):
        return None
    low, high = 0, len(candidates) - 1
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if decides(candidates[middle]) else (middle + 1, high)
    return candidates[low]


def rows_needed(estimate: float, tolerance: float, noise: Noise, rows: int, comparisons: int) -> int | None:
    """The fewest validation rows (seeds unchanged) whose interval decides; None when rows alone cannot."""
    seeds = noise.seed_terms if noise.seed_variance > 0 else []

    def decides(new_rows: int) -> bool:
        scaled = _scaled(noise.row_terms, rows / new_rows, (new_rows - 1) / max(rows - 1, 1))
        return _decides(estimate, tolerance, *satterthwaite(scaled + seeds), comparisons)

    grid = sorted({math.ceil(rows * f) for f in np.geomspace(1, MAX_ROW_FACTOR, 600)} - {rows})
    return _first(grid, decides)


def seeds_needed(estimate: float, tolerance: float, noise: Noise, seeds: int, comparisons: int) -> int | None:
    """The fewest seeds per configuration (rows unchanged) whose interval decides; None past MAX_SEEDS."""
    if noise.seed_variance <= 0:
        return None

    def decides(new_seeds: int) -> bool:
        # Every configuration replicated: the seed part falls as 1/seeds and its df grows with (seeds - 1).
        df_factor = (new_seeds - 1) / max(seeds - 1, 1)
        terms = noise.row_terms + _scaled(noise.seed_terms, seeds / new_seeds, df_factor)
        return _decides(estimate, tolerance, *satterthwaite(terms), comparisons)

    return _first(list(range(max(seeds, 1) + 1, MAX_SEEDS + 1)), decides)


def settle_text(comparison: Comparison, estimate: float, noise: Noise, metric: str) -> str:
    """Roughly how many seeds or validation rows would make the interval decide, under the full variance
    model and the t quantile at the new degrees of freedom; says when more rows alone cannot."""
    tolerance = math.log1p(comparison.tolerance) if metric == "perplexity" else comparison.tolerance
    rows = rows_needed(estimate, tolerance, noise, comparison.examples, comparison.comparisons)
    seeds = seeds_needed(estimate, tolerance, noise, comparison.seeds, comparison.comparisons)
    if noise.basis in ("none", "unmeasured"):
        if rows is None:
            return "more validation rows alone would not settle it"
        caveat = " (seed noise, not measured with one seed, may need more)" if noise.basis == "unmeasured" else ""
        return f"roughly {rows} validation rows would settle it{caveat}"
    if rows is None and seeds is None:
        return f"neither up to {MAX_SEEDS} seeds nor {MAX_ROW_FACTOR:,}x the validation rows would settle it"
    if rows is None:
        return (
            f"more validation rows alone cannot settle it (seed noise alone is too large); roughly {seeds} "
            "seeds per configuration would"
        )
    if seeds is not None and noise.seed_variance > noise.row_variance:
        return f"roughly {seeds} seeds per configuration would settle it (or {rows} validation rows)"
    return f"roughly {rows} validation rows would settle it" + (f" (or {seeds} seeds per configuration)"
                                                                if seeds is not None else "")  # fmt: skip


# --- one configuration's own interval ----------------------------------------------------------------------


def own_noise(evidence: Evidence, metric: str, pool: SeedPool | None = None) -> Noise:
    """The variance of one configuration's mean metric: rows (unpaired) plus its seed part."""
    table = evidence.scores(metric)
    row_terms = _row_terms(table.mean(axis=0))
    if not evidence.trained:
        return Noise(row_terms, [], "none", "evaluation noise only")
    if evidence.seeds >= 2:
        return Noise(*_with_splits(row_terms, [TwoWay.of(table).split(1 / evidence.seeds)]), "own", "seeds and rows")
    if pool is not None:
        return Noise(row_terms, [pool.split(1.0)[0]], "pooled", pool.describe())  # row part whole, as above
    return Noise(row_terms, [], "unmeasured", "evaluation noise only")


def wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion p from n (effective) observations at critical value z."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def own_interval(evidence: Evidence, metric: str = "perplexity", pool: SeedPool | None = None) -> tuple[float, float]:
    """95 % interval of one configuration's own metric, for error bars.

    Perplexity: t interval on the log scale with rows and seeds (two-way model).
    Accuracy, a proportion of prompts: a Wilson score interval on the effective
    number of observations p(1-p)/variance (rows and seeds together; at most
    seeds x prompts), at the t quantile of the variance's degrees of freedom:
    inside [0, 1] and not empty at 0 or all hits.
    """
    if metric == "accuracy" and evidence.correct is None:
        return float("nan"), float("nan")
    variance, df = own_noise(evidence, metric, pool).total()
    z = critical_values(1, df)[0]
    if metric == "perplexity":
        centre, se = float(evidence.log_perplexity().mean()), math.sqrt(variance)
        return math.exp(centre - z * se), math.exp(centre + z * se)
    p = float(evidence.accuracy().mean())
    observations = evidence.correct.size
    effective = min(observations, p * (1 - p) / variance) if variance > 0 and 0 < p < 1 else observations
    return wilson(p, effective, z)


# --- reading the study's per-row scores ---------------------------------------------------------------------


def evidence_from_examples(examples: pd.DataFrame) -> dict[str, Evidence]:
    """Per configuration (config_id), its seeds' per-row scores from results/tables/examples.csv; the base
    models (ids 'base', 'base-*') train nothing and so carry no seed noise."""
    from lora_study.study.sweep import is_baseline_id

    evidence = {}
    for config_id, group in examples.groupby("config_id", sort=False):
        runs = [run.sort_values("row") for _, run in group.groupby("run_id", sort=True)]
        if not runs or any(run.empty for run in runs) or len({len(run) for run in runs}) != 1:
            continue
        correct = [pd.to_numeric(run["correct"], errors="coerce").dropna().to_numpy() for run in runs]
        seed_ids = tuple(_seed_of(run) for run in runs)
        trained = not is_baseline_id(str(config_id))
        evidence[str(config_id)] = Evidence(
            nll=np.stack([run["nll"].to_numpy(dtype=float) for run in runs]),
            tokens=runs[0]["tokens"].to_numpy(dtype=float),
            correct=np.stack(correct) if correct[0].size else None,
            seed_ids=() if None in seed_ids else seed_ids,  # type: ignore[arg-type]
            trained=trained,
        )
    return evidence


def _seed_of(run: pd.DataFrame) -> int | None:
    if "seed" not in run:
        return None
    value = pd.to_numeric(run["seed"], errors="coerce").iloc[0]
    return None if pd.isna(value) else int(value)


# Perplexity on general text the runs were not trained on (evaluation.forgetting): what a run forgets.
GENERAL = "general_perplexity"


@dataclass
class Judge:
    """Compares configurations by id; None where a configuration has no per-row scores.

    Pools the study's seed variance once per metric, and records every comparison it makes (the
    report's comparison chart and table).
    """

    evidence: dict[str, Evidence]
    records: list[dict] = field(default_factory=list)
    _pools: dict[str, SeedPool | None] = field(default_factory=dict, repr=False)
    # Per configuration, its seeds' per-row NLL on general text (evaluation.forgetting): metric GENERAL.
    general: dict[str, Evidence] = field(default_factory=dict)

    def _on(self, metric: str) -> tuple[dict[str, Evidence], str]:
        """The evidence a metric is judged on, and the metric as the statistics know it (general-text
        perplexity is a perplexity on other rows: the same paired test, its own seed pool)."""
        return (self.general, "perplexity") if metric == GENERAL else (self.evidence, metric)

    def pool(self, metric: str) -> SeedPool | None:
        if metric not in self._pools:
            evidence, statistic = self._on(metric)
            self._pools[metric] = seed_pool(evidence, statistic)
        return self._pools[metric]

    def compare(
        self, candidate: str, reference: str, metric: str, tolerance: float, comparisons: int = 1
    ) -> Comparison | None:
        evidence, statistic = self._on(metric)
        if candidate not in evidence or reference not in evidence:
            return None
        a, b = evidence[candidate], evidence[reference]
        if statistic == "accuracy" and (a.correct is None or b.correct is None):
            return None
        result = compare(a, b, statistic, tolerance, max(1, comparisons), self.pool(metric))
        result = replace(result, metric=metric)
        self.records.append({"candidate": candidate, "reference": reference, "comparison": result})
        return result

    def own_interval(self, config_id: str, metric: str) -> tuple[float, float]:
        evidence, statistic = self._on(metric)
        if config_id not in evidence:
            return math.nan, math.nan
        return own_interval(evidence[config_id], statistic, self.pool(metric))


def comparisons_table(judge: Judge) -> pd.DataFrame:
    """Every comparison the findings made (first occurrence of each), for the comparison chart."""
    rows, seen = [], set()
    for record in judge.records:
        c: Comparison = record["comparison"]
        key = (record["candidate"], record["reference"], c.metric, c.tolerance, c.comparisons)
        if key in seen:
            continue
        seen.add(key)
        scale = 100.0
        rows.append({
            "candidate": record["candidate"], "reference": record["reference"], "metric": c.metric,
            "change_pct": scale * c.change, "low_pct": scale * c.low, "high_pct": scale * c.high,
            "tolerance_pct": scale * c.tolerance, "comparisons": c.comparisons, "df": c.df,
            "verdict": c.verdict.value, "noise": c.sources,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["candidate", "reference", "metric", "change_pct", "low_pct", "high_pct",
                                       "tolerance_pct", "comparisons", "df", "verdict", "noise"])  # fmt: skip
