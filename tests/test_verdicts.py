"""Verdicts and intervals on constructed per-example data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora_study.stats.verdicts import (
    Evidence,
    Judge,
    Verdict,
    against_best,
    classify,
    compare,
    critical_values,
    own_interval,
)

ROWS = 400


def evidence(nll_rows: np.ndarray, tokens: np.ndarray | None = None) -> Evidence:
    """Per-row NLL sums (one row per seed) with 10 response tokens per row unless given."""
    nll = np.atleast_2d(nll_rows)
    return Evidence(nll=nll, tokens=np.full(nll.shape[1], 10.0) if tokens is None else tokens)


def reference_rows(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).gamma(4.0, 5.0, ROWS)  # ~20 nats per 10-token row


def test_equivalence_is_checked_before_a_difference():
    # The interval excludes zero (a detectable change) but lies inside the tolerance: equivalent.
    assert classify(-0.015, -0.005, -0.014, -0.006, 0.02, lower_is_better=True) is Verdict.EQUIVALENT
    assert classify(-0.05, -0.03, -0.048, -0.032, 0.02, lower_is_better=True) is Verdict.BETTER
    assert classify(0.03, 0.05, 0.032, 0.048, 0.02, lower_is_better=True) is Verdict.WORSE
    assert classify(0.03, 0.05, 0.032, 0.048, 0.02, lower_is_better=False) is Verdict.BETTER
    assert classify(-0.01, 0.05, -0.008, 0.048, 0.02, lower_is_better=True) is Verdict.INCONCLUSIVE


def test_each_verdict_on_constructed_runs():
    rng = np.random.default_rng(1)
    reference = reference_rows()
    noise = rng.normal(0, 0.5, ROWS)
    cases = {
        Verdict.BETTER: reference * 0.90 + noise,  # perplexity ratio exp(-0.1 * 2) ~ 0.82
        Verdict.WORSE: reference * 1.10 + noise,
        Verdict.EQUIVALENT: reference + noise * 0.1,
    }
    for expected, candidate in cases.items():
        result = compare(evidence(candidate), evidence(reference), "perplexity", tolerance=0.02)
        assert result.verdict is expected, result.describe()
        assert result.sources == "evaluation noise only"
        assert result.low <= result.change <= result.high
    # A real but small-sample, noisy difference: neither excluded from zero nor inside the tolerance.
    few = slice(0, 12)
    noisy = reference[few] * 1.03 + rng.normal(0, 3.0, 12)
    result = compare(evidence(noisy), evidence(reference[few]), "perplexity", tolerance=0.02)
    assert result.verdict is Verdict.INCONCLUSIVE, result.describe()
    assert "validation rows would settle it" in result.settle and "seed noise" in result.settle


def test_the_multiple_comparison_correction_widens_the_interval():
    rng = np.random.default_rng(2)
    reference = reference_rows()
    candidate = reference * 0.995 + rng.normal(0, 0.85, ROWS)
    single = compare(evidence(candidate), evidence(reference), "perplexity", tolerance=0.001)
    many = compare(evidence(candidate), evidence(reference), "perplexity", tolerance=0.001, comparisons=50)
    assert single.change == many.change
    assert many.low < single.low and many.high > single.high
    assert single.verdict is Verdict.BETTER and many.verdict is Verdict.INCONCLUSIVE, (single, many)
    assert "50 comparisons" in many.describe()


def test_row_noise_is_the_paired_spread_on_a_known_case():
    rng = np.random.default_rng(3)
    reference = rng.normal(200, 50, 2500)  # large spread between rows...
    difference = rng.choice([-1.0, 1.0], 2500)  # ...but each pair differs by exactly +-1 nat (10 tokens per row)
    result = compare(evidence(reference + difference), evidence(reference), "perplexity", tolerance=0.02)
    assert result.se_eval == pytest.approx(0.1 / math.sqrt(2500), rel=0.05)  # sd of the per-token differences / sqrt(n)
    # A constant shift has no evaluation noise at all when paired.
    assert compare(evidence(reference + 3.0), evidence(reference), "perplexity", 0.02).se_eval == pytest.approx(
        0, abs=1e-9
    )


def test_seeds_add_their_own_noise_and_say_which_dominates():
    reference = reference_rows()
    seeds = np.stack([reference * factor for factor in (1.00, 1.06, 0.95)])  # seeds disagree a lot
    candidate = np.stack([reference * factor for factor in (0.90, 0.97, 0.91)])
    result = compare(evidence(candidate), evidence(seeds), "perplexity", tolerance=0.02)
    assert math.isfinite(result.se_seed) and result.se_seed > result.se_eval
    assert result.sources == "evaluation rows and seeds (3 and 3) (seed noise dominates)"
    assert result.verdict is Verdict.INCONCLUSIVE
    assert "validation rows alone cannot settle it" in result.settle
    assert "seeds per configuration would" in result.settle


def test_accuracy_is_compared_pairwise_over_the_same_prompts():
    rng = np.random.default_rng(4)
    reference = (rng.random(300) < 0.5).astype(float)
    candidate = reference.copy()
    flip = rng.choice(300, 60, replace=False)
    candidate[flip] = 1.0  # 60 prompts fixed, none broken: about +10 points
    tokens = np.full(300, 10.0)
    a = Evidence(nll=np.zeros((1, 300)), tokens=tokens, correct=candidate[None])
    b = Evidence(nll=np.zeros((1, 300)), tokens=tokens, correct=reference[None])
    result = compare(a, b, "accuracy", tolerance=0.02)
    assert result.verdict is Verdict.BETTER and result.change == pytest.approx(candidate.mean() - reference.mean())
    assert "pts" in result.interval_text()


def test_own_accuracy_interval_is_a_proportions_interval():
    """Wilson score: inside [0, 1] and not empty at 0 hits, where a resampled standard error is zero."""
    rows = 64
    evidence = {hits: Evidence(np.ones((1, rows)), np.ones(rows), (np.arange(rows) < hits)[None, :].astype(float))
                for hits in (0, 1, 32, 64)}  # fmt: skip
    low, high = own_interval(evidence[0], "accuracy")
    z = critical_values(1, math.inf)[0]  # no spread at all: nothing to estimate, the normal quantile
    assert low == 0 and high == pytest.approx(z**2 / (rows + z**2), rel=1e-3)  # Wilson's upper bound at 0
    low, high = own_interval(evidence[1], "accuracy")
    assert 0 < low < 1 / rows < high
    low, high = own_interval(evidence[32], "accuracy")
    assert low == pytest.approx(1 - high) and high - low == pytest.approx(2 * 1.96 * 0.5 / 8, rel=0.05)
    assert own_interval(evidence[64], "accuracy")[1] == 1
    # Seeds that disagree widen it.
    seeds = Evidence(np.ones((2, rows)), np.ones(rows), np.stack([np.arange(rows) < 24, np.arange(rows) < 40]) * 1.0)
    one_seed = own_interval(evidence[32], "accuracy")
    assert own_interval(seeds, "accuracy")[1] - own_interval(seeds, "accuracy")[0] > one_seed[1] - one_seed[0]


def seeded(reference: np.ndarray, factors: tuple[float, ...], seed_ids: tuple[int, ...] = (), **kw) -> Evidence:
    return Evidence(nll=np.stack([reference * f for f in factors]), tokens=np.full(ROWS, 10.0),
                    seed_ids=seed_ids, **kw)  # fmt: skip


def test_one_seed_borrows_the_pooled_replicates_and_the_base_model_has_no_seed_noise():
    reference = reference_rows()
    judge = Judge({
        "centre": seeded(reference, (1.00, 1.03, 0.98), (0, 1, 2)),
        "single": seeded(reference * 0.97, (1.0,), (0,)),
        "base": seeded(reference * 1.5, (1.0,), (), trained=False),
    })  # fmt: skip
    pooled = judge.compare("single", "centre", "perplexity", 0.02)
    assert "seed noise pooled from 3 replicates of centre" in pooled.sources and math.isfinite(pooled.se_seed)
    unpooled = compare(judge.evidence["single"], judge.evidence["centre"], "perplexity", 0.02)
    assert pooled.high - pooled.low > unpooled.high - unpooled.low  # the one seed's own noise now counts
    # Against the untrained base model the trained side keeps its own seed term, the base adds none.
    own = judge.compare("centre", "base", "perplexity", 0.02)
    assert own.sources.startswith("evaluation rows and seeds (3)") and own.se_seed > 0
    assert judge.compare("single", "base", "perplexity", 0.02).se_seed == pytest.approx(
        pooled.se_seed / math.sqrt(4 / 3)
    )


def test_shared_seeds_are_paired_and_a_shared_seed_effect_cancels():
    reference = reference_rows()
    shifts = (1.00, 1.05, 0.96)  # each seed moves both configurations alike (same data order, same init)
    a = seeded(reference, tuple(f * 0.95 for f in shifts), (0, 1, 2))
    b = seeded(reference, shifts, (0, 1, 2))
    paired = compare(a, b, "perplexity", 0.02)
    unpaired = compare(
        seeded(reference, tuple(f * 0.95 for f in shifts)), seeded(reference, shifts), "perplexity", 0.02
    )
    assert "paired by seed" in paired.sources and paired.se_seed < 0.1 * unpaired.se_seed
    assert paired.verdict is Verdict.BETTER and unpaired.verdict is Verdict.INCONCLUSIVE


def test_an_equivalent_but_real_change_says_so():
    reference = reference_rows()
    result = compare(evidence(reference * 1.005), evidence(reference), "perplexity", tolerance=0.02)
    assert result.verdict is Verdict.EQUIVALENT and result.low > 0
    assert result.describe().startswith(
        "equivalent; a real but negligible change: +1.0% [+0.9, +1.0] (95.0% interval), "
        "inside the tolerance 2% (90.0% equivalence interval [+0.9, +1.0]"
    )


def test_picking_the_best_of_k_corrects_over_every_pair():
    assert [against_best(k) for k in (1, 2, 3, 5)] == [1, 1, 3, 10]
