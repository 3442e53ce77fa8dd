"""Expand the `sweep` section into run specifications with stable, readable ids."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from typing import Any

from lora_study.config import ConfigError
from lora_study.modules import ALL_LINEAR, canonical_modules, modules_label

BASELINE_ID = "base"
FOUR_BIT = ("nf4", "fp4")
# Quantizations whose base weights bitsandbytes holds (the rest are plain dtypes).
BITSANDBYTES = (*FOUR_BIT, "int8")


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one trained configuration (or the baseline)."""

    run_id: str
    rank: int
    alpha: float
    modules: tuple[str, ...]
    quantization: str
    double_quant: bool
    training: dict[str, Any]
    is_baseline: bool = False
    # The configuration this run replicates (equal to run_id without a seeds axis).
    config_id: str = ""

    def __post_init__(self) -> None:
        if not self.config_id:
            object.__setattr__(self, "config_id", self.run_id)

    def as_params(self) -> dict[str, Any]:
        """Plain data for Snakemake params and run tables."""
        params = asdict(self)
        params["modules"] = list(self.modules)
        return params


def resolve_alpha(alpha: float | str, rank: int) -> float:
    """'2r' -> 2 * rank; a number stays as it is."""
    if isinstance(alpha, str):
        return float(alpha[:-1]) * rank
    return float(alpha)


def quantization_label(quantization: str, double_quant: bool) -> str:
    if quantization in FOUR_BIT and not double_quant:
        return f"{quantization}-nodq"
    return quantization


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def run_id(rank: int, alpha: float, modules: tuple[str, ...], quantization: str, double_quant: bool) -> str:
    """`r16-qkvo-nf4`; alpha appears only when it is not 2 x rank."""
    parts = [f"r{rank}"]
    if alpha != 2 * rank:
        parts.append(f"a{_format_number(alpha)}")
    parts.append(modules_label(modules))
    parts.append(quantization_label(quantization, double_quant))
    return "-".join(parts)


def _make_spec(
    entry_id: str | None,
    rank: int,
    alpha_setting: float | str,
    modules: list[str],
    quantization: str,
    double_quant: bool,
    training: dict[str, Any],
) -> RunSpec:
    if ALL_LINEAR in modules and len(modules) > 1:
        raise ConfigError(f"modules {modules}: 'all-linear' cannot be combined with other modules")
    alpha = resolve_alpha(alpha_setting, rank)
    ordered = tuple(canonical_modules(modules))
    # Double quantization only exists for 4-bit weights; normalise it elsewhere.
    double_quant = double_quant if quantization in FOUR_BIT else False
    return RunSpec(
        run_id=entry_id or run_id(rank, alpha, ordered, quantization, double_quant),
        rank=rank,
        alpha=alpha,
        modules=ordered,
        quantization=quantization,
        double_quant=double_quant,
        training=training,
    )


def _grid_specs(grid: dict[str, Any], training: dict[str, Any]) -> list[RunSpec]:
    axes = itertools.product(grid["rank"], grid["alpha"], grid["modules"], grid["quantization"], grid["double_quant"])
    return [
        _make_spec(None, rank, alpha, list(modules), quant, dq, training) for rank, alpha, modules, quant, dq in axes
    ]


def expand_study(config: dict[str, Any]) -> dict[str, RunSpec]:
    """All runs of a validated config, by run id, in config order.

    Identical runs produced by several grids are merged; two different runs
    with one id are an error, as is an empty sweep.
    """
    sweep = config["sweep"]
    defaults = config["training"]
    runs: dict[str, RunSpec] = {}
    origins: dict[str, str] = {}

    def add(spec: RunSpec, origin: str) -> None:
        if spec.run_id == BASELINE_ID:
            raise ConfigError(f"{origin}: run id '{BASELINE_ID}' is reserved for the baseline")
        previous = runs.get(spec.run_id)
        if previous is not None and (previous != spec or origin.startswith("sweep.runs")):
            raise ConfigError(f"duplicate run id '{spec.run_id}' from {origins[spec.run_id]} and {origin}")
        runs.setdefault(spec.run_id, spec)
        origins.setdefault(spec.run_id, origin)

    for index, grid in enumerate(sweep["grids"]):
        for spec in _grid_specs(grid, dict(defaults)):
            add(spec, f"sweep.grids[{index}]")
    for index, entry in enumerate(sweep["runs"]):
        training = {**defaults, **entry["training"]}
        spec = _make_spec(
            entry.get("id"),
            entry["rank"],
            entry["alpha"],
            list(entry["modules"]),
            entry["quantization"],
            entry["double_quant"],
            training,
        )
        add(spec, f"sweep.runs[{index}]")
    if not runs:
        raise ConfigError("config key 'sweep': no runs; add a grid or a named run")
    return replicate(runs, sweep["seeds"])


def replicate(configs: dict[str, RunSpec], seeds: list[int] | None) -> dict[str, RunSpec]:
    """One run per configuration and seed ('r16-qkvo-nf4-s1'); unchanged without seeds."""
    if not seeds:
        return configs
    runs: dict[str, RunSpec] = {}
    for config_id, spec in configs.items():
        for seed in seeds:
            replica = replace(
                spec,
                run_id=f"{config_id}-s{seed}",
                config_id=config_id,
                training={**spec.training, "seed": seed},
            )
            runs[replica.run_id] = replica
    return runs


def baseline_spec(config: dict[str, Any]) -> RunSpec | None:
    """The base model without adapter, evaluated like the runs, or None."""
    sweep = config["sweep"]
    if not sweep["baseline"]:
        return None
    return RunSpec(
        run_id=BASELINE_ID,
        rank=0,
        alpha=0.0,
        modules=(),
        quantization=sweep["baseline_quantization"],
        double_quant=False,
        training={},
        is_baseline=True,
    )


def all_evaluated(config: dict[str, Any]) -> dict[str, RunSpec]:
    """Trained runs plus the baseline: everything that gets an eval_metrics.json."""
    runs = expand_study(config)
    baseline = baseline_spec(config)
    return {**({BASELINE_ID: baseline} if baseline else {}), **runs}
