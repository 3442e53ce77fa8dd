"""The verdicts' error rates and coverage on simulated studies with a known truth (bench/calibration.py, fast).

Bounds: false better/worse within [1 %, 8 %] at the nominal 5 %, coverage of the
95 % intervals within [0.92, 0.98], power at a real +5 % change with three seeds
per side at least four times what the verdicts had before the variance model
(8 % seed-dominated, 3 % row-dominated).
"""

from __future__ import annotations

import types

import pytest

from lora_study.stats import calibration, verdicts

DATASETS = 1000  # per scenario and truth: a rate of 5 % is known to +-1.4 % (95 %)


@pytest.fixture(scope="module")
def table() -> dict[str, dict]:
    return {row["scenario"]: row for row in calibration.calibration_table(DATASETS, verdicts, seed=0)}


@pytest.mark.parametrize("scenario", [s.name for s in calibration.SCENARIOS])
def test_false_better_worse_rate_and_coverage_are_what_they_claim(table, scenario):
    row = table[scenario]
    assert 0.01 <= row["false better/worse"] <= 0.08, row
    assert 0.92 <= row["coverage"] <= 0.98, row


def test_seeded_verdicts_have_power_at_a_real_five_percent_change(table):
    assert table["seed-dominated, 3 vs 3 seeds"]["power at +5%"] >= 4 * 0.08
    assert table["row-dominated, 3 vs 3 seeds"]["power at +5%"] >= 4 * 0.03


def test_own_accuracy_interval_covers_the_true_accuracy(table):
    row = table["own accuracy interval, 3 seeds x 48 prompts"]
    assert 0.92 <= row["coverage"] <= 0.98, row


def test_the_check_catches_a_verdict_that_ignores_training_noise():
    """The same simulation through verdicts that treat every run as untrained (no seed noise, as a
    single-seed study without replicates would): its false rate leaves the band, so the bounds bite."""
    blind = types.SimpleNamespace(**vars(verdicts))

    def untrained(**fields):
        return verdicts.Evidence(**{**fields, "trained": False})

    blind.Evidence = untrained
    blind.Evidence.__dataclass_fields__ = verdicts.Evidence.__dataclass_fields__
    scenario = next(s for s in calibration.SCENARIOS if s.name.startswith("1 seed vs 1 seed"))
    rates = calibration.measure(scenario, 300, blind, seed=1)
    assert rates.false_decisions > 0.08 and rates.coverage < 0.92, rates
