"""Seeds as replicates: ids, per-configuration statistics and the noise rule."""

import math
import re

import numpy as np
import pandas as pd
import pytest
from test_findings import SETTINGS, all_tables, headline_findings, run, study

from lora_study.stats.replicates import ci_halfwidth, config_table
from lora_study.stats.verdicts import Evidence, Judge
from lora_study.study.config import validate_config
from lora_study.study.sweep import expand_study


def test_seeds_axis_replicates_every_configuration():
    config = validate_config(
        {
            "model": {"source": "m"},
            "dataset": {"source": "generated"},
            "sweep": {"grids": [{"rank": [4, 8]}], "seeds": [0, 1, 2]},
        }
    )
    runs = expand_study(config)
    assert list(runs)[:3] == ["r4-qkvo-nf4-s0", "r4-qkvo-nf4-s1", "r4-qkvo-nf4-s2"]
    assert len(runs) == 6
    replica = runs["r8-qkvo-nf4-s2"]
    assert (replica.config_id, replica.training.seed) == ("r8-qkvo-nf4", 2)


def test_ci_halfwidth_is_the_t_interval():
    # values 1, 2, 3: std 1, t(0.975, df=2) = 4.3027 -> 4.3027 / sqrt(3)
    assert ci_halfwidth(1.0, 3) == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(ci_halfwidth(1.0, 1))


def seeds(config_id, perplexities, **kwargs):
    return [
        {**run(f"{config_id}-s{i}", ppl=p, **kwargs), "config_id": config_id, "seed": i}
        for i, p in enumerate(perplexities)
    ]


def test_config_table_means_spread_and_fit():
    runs = pd.DataFrame(seeds("a", [4.0, 5.0, 6.0]) + seeds("b", [3.0, 3.0], status="ok"))
    runs.loc[4, "status"] = "oom"
    configs = config_table(runs).set_index("run_id")
    assert configs.loc["a", "n"] == 3 and configs.loc["a", "perplexity"] == pytest.approx(5.0)
    assert configs.loc["a", "perplexity_std"] == pytest.approx(1.0)
    assert configs.loc["a", "perplexity_ci95"] == pytest.approx(ci_halfwidth(1.0, 3))
    assert configs.loc["b", "status"] == "oom"  # one seed ran out of memory: the configuration does not fit
    assert "seed" not in configs.columns


def seeded_judge(runs: list[dict], rows: int = 300) -> Judge:
    """Per-row scores for each configuration's seeds: one shared row pattern, each seed's own perplexity."""
    pattern = np.random.default_rng(0).gamma(4.0, 1.0, rows)
    tokens = np.full(rows, 10.0)
    by_config: dict[str, list[float]] = {}
    for row in runs:
        by_config.setdefault(row["config_id"], []).append(row["perplexity"])
    return Judge({
        config: Evidence(nll=np.stack([tokens * math.log(p) * pattern / pattern.mean() for p in ppls]), tokens=tokens)
        for config, ppls in by_config.items()
    })  # fmt: skip


def test_verdicts_cover_seed_noise_and_say_it_dominates():
    replicated = (
        seeds("r4", [8.0, 8.2, 7.8], rank=4, mem=2.0)
        + seeds("r8", [6.0, 6.1, 5.9], rank=8, mem=3.0)
        + seeds("r16", [5.0, 4.9, 5.1], rank=16, mem=4.0)
        + seeds("r32", [4.9, 5.3, 4.5], rank=32, mem=6.0)
    )
    base = {**run("base-nf4", rank=0, modules="", quant="nf4", ppl=20.0, mem=1.0, params=0), "config_id": "base-nf4"}
    configs = config_table(pd.DataFrame([base, *replicated]))
    judge = seeded_judge(replicated)
    tables = all_tables(configs, SETTINGS, judge)
    assert {"n", "perplexity_ci95", "perplexity_low", "perplexity_high"} <= set(tables["rank"].columns)
    steps = tables["diminishing_returns"]
    assert list(steps["verdict"]) == ["better", "better", "inconclusive"]  # r32's seeds disagree
    assert (steps["noise"] == "evaluation rows and seeds (3 and 3) (seed noise dominates)").all()
    sentences = headline_findings(configs, SETTINGS, judge)
    # r32 is 2 % better than r16 on average, but its seeds spread 4.5-5.3: nothing can be stated from it.
    diminishing = next(s for s in sentences if "iminish" in s)
    assert diminishing.startswith("Diminishing returns: inconclusive above rank 16")
    # Seed noise alone exceeds what a decision needs: more rows cannot settle it, more seeds can.
    assert re.search(r"more validation rows alone cannot settle it \(seed noise alone is too large\); roughly "
                     r"\d+ seeds per configuration would\.$", diminishing)  # fmt: skip
    assert any(s.startswith("Noise: 3 seeds per configuration") for s in sentences)


def test_single_seed_studies_say_verdicts_cover_evaluation_noise_only():
    sentences = headline_findings(study(run("a")), SETTINGS)
    assert any(s.startswith("Noise: one seed per configuration") and "evaluation noise only" in s for s in sentences)
