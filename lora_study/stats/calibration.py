"""Calibration of the verdicts: simulated studies with a known truth, fed through the findings' own Judge.

Each simulated configuration c is scored on the same validation rows, per seed s
and row i, with per-token NLL

    x[c, s, i] = mu[c] + common[i] + row[c, i] + seed[c, s] + interaction[c, s, i]

(summed over the row's w_i response tokens, w_i drawn once per study). common
is the rows' shared difficulty (it cancels in a paired comparison); row the
configuration's own row effect (evaluation noise); seed the training seed's
effect, correlated across configurations that share a seed (same data order
and initialisation noise); interaction the seed's effect on single rows. The
truth of a comparison is mu[candidate] - mu[reference] on the log-perplexity
scale. The base model (an untrained reference) has no seed terms.

A scenario's rates are over `datasets` simulated studies: the share of verdicts
*better*/*worse* when there is no difference (false), the share *equivalent*
when there is none (tolerance 2 %), the share *worse* at a real +5 % change in
perplexity (power), and how often the printed interval holds the true change
(coverage). The best-of-k scenario picks the best of k equal configurations by
point estimate, compares the others with it, and counts a study as false when
any of those comparisons reads better or worse (and as covered when every
interval holds the truth, zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

TOLERANCE = 0.02
REAL_CHANGE = 0.05  # +5 % perplexity
ROWS = 96
PROMPTS = 48


@dataclass(frozen=True)
class Scenario:
    """A simulated comparison: candidate against reference, or the best of `candidates` equal ones."""

    name: str
    candidate_seeds: int
    reference_seeds: int  # 0: the base model (untrained, deterministic)
    row_sd: float
    seed_sd: float
    interaction_sd: float
    seed_correlation: float = 0.0
    replicates: int = 0  # a further configuration trained with this many seeds (the replicated centre point)
    candidates: int = 1  # > 1: best-of-k selection among equal configurations (reference unused)


SCENARIOS = (
    Scenario("seed-dominated, 3 vs 3 seeds", 3, 3, row_sd=0.05, seed_sd=0.025, interaction_sd=0.1,
             seed_correlation=0.5),
    Scenario("row-dominated, 3 vs 3 seeds", 3, 3, row_sd=0.16, seed_sd=0.004, interaction_sd=0.05),
    Scenario("3 seeds vs the base model (untrained)", 3, 0, row_sd=0.10, seed_sd=0.015, interaction_sd=0.08),
    Scenario("1 seed vs 1 seed, 3 replicates of the reference", 1, 1, row_sd=0.10, seed_sd=0.015,
             interaction_sd=0.08, replicates=3),
    Scenario("best of 5, all equal, 1 seed each + 3 replicates", 1, 1, row_sd=0.10, seed_sd=0.015,
             interaction_sd=0.08, replicates=3, candidates=5),
)  # fmt: skip


@dataclass
class Rates:
    scenario: str
    datasets: int
    false_decisions: float  # better/worse with no difference
    equivalent_under_null: float
    power: float  # "worse" at a real +5 %
    coverage: float  # the printed difference interval holds the truth (no difference and +5 % together)

    def row(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "datasets": self.datasets, "false better/worse": self.false_decisions,
                "equivalent (null)": self.equivalent_under_null, "power at +5%": self.power,
                "coverage": self.coverage}  # fmt: skip


def _evidence(verdicts: ModuleType, nll: np.ndarray, tokens: np.ndarray, seed_ids: tuple[int, ...], trained: bool,
              correct: np.ndarray | None = None):  # fmt: skip
    """An Evidence of whichever verdicts module is measured (older ones know neither seeds nor training)."""
    fields = getattr(verdicts.Evidence, "__dataclass_fields__", {})
    extra = {"seed_ids": seed_ids, "trained": trained} if "trained" in fields else {}
    return verdicts.Evidence(nll=nll, tokens=tokens, correct=correct, **extra)


def simulate_study(
    scenario: Scenario, change: float, rng: np.random.Generator, verdicts: ModuleType
) -> tuple[Any, list[str], str]:
    """A Judge over one simulated study, the candidate ids and the reference id."""
    tokens = rng.integers(8, 64, ROWS).astype(float)
    common = rng.normal(2.0, 0.8, ROWS)
    shared_seed = rng.normal(0.0, 1.0, 64)  # each seed's effect shared by every configuration (correlation)

    def config(mu: float, seeds: int, trained: bool = True):
        seeds = max(seeds, 1)
        own = rng.normal(0.0, scenario.row_sd, ROWS)
        corr = scenario.seed_correlation
        if trained:
            seed_effect = scenario.seed_sd * (math.sqrt(corr) * shared_seed[:seeds]
                                              + math.sqrt(1 - corr) * rng.normal(0.0, 1.0, seeds))  # fmt: skip
            inter = rng.normal(0.0, scenario.interaction_sd, (seeds, ROWS))
        else:
            seed_effect, inter = np.zeros(seeds), np.zeros((seeds, ROWS))
        per_token = mu + common[None, :] + own[None, :] + seed_effect[:, None] + inter
        return _evidence(verdicts, per_token * tokens[None, :], tokens, tuple(range(seeds)), trained)

    evidence = {}
    candidates = [f"c{k}" for k in range(scenario.candidates)]
    if scenario.candidates > 1:
        for name in candidates:
            evidence[name] = config(0.0, scenario.candidate_seeds)
        reference = ""
    else:
        evidence["c0"] = config(math.log1p(change), scenario.candidate_seeds)
        reference = "reference"
        evidence[reference] = config(0.0, scenario.reference_seeds, trained=scenario.reference_seeds > 0)
    if scenario.replicates:
        evidence["centre"] = config(0.1, scenario.replicates)
    return verdicts.Judge(evidence), candidates, reference


def _selection(judge: Any, candidates: list[str], verdicts: ModuleType) -> tuple[bool, bool]:
    """(any false better/worse, every interval holds zero) for the best-of-k sentence."""
    means = {c: float(judge.evidence[c].log_perplexity().mean()) for c in candidates}
    best = min(means, key=means.__getitem__)
    m = verdicts.against_best(len(candidates)) if hasattr(verdicts, "against_best") else len(candidates) - 1
    results = [judge.compare(c, best, "perplexity", TOLERANCE, m) for c in candidates if c != best]
    false = any(r.verdict.value in ("better", "worse") for r in results)
    covered = all(r.low <= 0 <= r.high for r in results)
    return false, covered


def measure(scenario: Scenario, datasets: int, verdicts: ModuleType, seed: int = 0) -> Rates:
    """The scenario's rates over `datasets` simulated studies per truth."""
    rng = np.random.default_rng(seed)
    false = equivalent = worse = covered = 0
    for _ in range(datasets):
        judge, candidates, reference = simulate_study(scenario, 0.0, rng, verdicts)
        if scenario.candidates > 1:
            is_false, is_covered = _selection(judge, candidates, verdicts)
            false += is_false
            covered += is_covered
            continue
        null = judge.compare(candidates[0], reference, "perplexity", TOLERANCE)
        false += null.verdict.value in ("better", "worse")
        equivalent += null.verdict.value == "equivalent"
        covered += null.low <= 0 <= null.high
        judge, candidates, reference = simulate_study(scenario, REAL_CHANGE, rng, verdicts)
        real = judge.compare(candidates[0], reference, "perplexity", TOLERANCE)
        worse += real.verdict.value == "worse"
        covered += real.low <= REAL_CHANGE <= real.high
    truths = 1 if scenario.candidates > 1 else 2
    nan = float("nan")
    return Rates(scenario.name, datasets, false / datasets,
                 equivalent / datasets if scenario.candidates == 1 else nan,
                 worse / datasets if scenario.candidates == 1 else nan,
                 covered / (truths * datasets))  # fmt: skip


# --- a configuration's own accuracy interval -------------------------------------------------------------


def accuracy_coverage(datasets: int, seeds: int, verdicts: ModuleType, seed: int = 0) -> float:
    """How often a configuration's own 95 % accuracy interval holds its true accuracy (over prompts and
    seeds), with `seeds` seeds x PROMPTS prompts: prompt difficulty and seed effects on the logit scale."""
    rng = np.random.default_rng(seed)
    centre, prompt_sd, seed_sd = 0.3, 1.5, 0.4
    spread = rng.normal(0.0, math.hypot(prompt_sd, seed_sd), 400_000)  # prompt and seed effects together
    truth = float(np.mean(1 / (1 + np.exp(-(centre + spread)))))
    held = 0
    for _ in range(datasets):
        logits = centre + rng.normal(0, prompt_sd, PROMPTS)[None, :] + rng.normal(0, seed_sd, seeds)[:, None]
        correct = (rng.random((seeds, PROMPTS)) < 1 / (1 + np.exp(-logits))).astype(float)
        evidence = _evidence(verdicts, np.ones((seeds, PROMPTS)), np.ones(PROMPTS), tuple(range(seeds)), True, correct)
        low, high = verdicts.own_interval(evidence, "accuracy")
        held += low <= truth <= high
    return held / datasets


def calibration_table(datasets: int, verdicts: ModuleType, seed: int = 0) -> list[dict[str, Any]]:
    """Every scenario's rates, then the accuracy-interval coverage line."""
    rows = [measure(scenario, datasets, verdicts, seed).row() for scenario in SCENARIOS]
    rows.append({"scenario": "own accuracy interval, 3 seeds x 48 prompts", "datasets": datasets,
                 "coverage": accuracy_coverage(datasets, 3, verdicts, seed)})  # fmt: skip
    return rows
