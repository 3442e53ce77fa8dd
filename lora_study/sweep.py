"""Expand the `sweep` section into run specifications with stable, readable ids."""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

from lora_study.config import ConfigError
from lora_study.formats import FOUR_BIT, applies_compute_dtype, quantization_label
from lora_study.modules import ALL_LINEAR, canonical_modules, modules_label
from lora_study.settings import TrainingSettings

log = logging.getLogger("lora_study")

# Baselines (the base model without adapter) are evaluated once per weight format: base-nf4, base-16bit, ...
BASELINE_PREFIX = "base"


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one trained configuration (or the baseline)."""

    run_id: str
    rank: int
    alpha: float
    modules: tuple[str, ...]
    quantization: str
    double_quant: bool
    training: TrainingSettings | None  # None for a baseline: it trains nothing
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
        params["training"] = self.training.to_dict() if self.training else None
        return params

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RunSpec:
        """The run again, from what as_params wrote (a rule script's params)."""
        values = dict(params)
        training = values.pop("training", None)
        values["modules"] = tuple(values["modules"])
        where = f"run '{values.get('run_id')}'"
        return cls(**values, training=TrainingSettings.from_dict(training, where) if training else None)

    @property
    def format_label(self) -> str:
        """The weight format: nf4, nf4-nodq, int8, 16bit, bf16, ..."""
        return quantization_label(self.quantization, self.double_quant)

    @property
    def baseline_id(self) -> str:
        """The baseline this run is compared with: the base model in the same weight format."""
        return baseline_id(self.quantization, self.double_quant)


def resolve_alpha(alpha: float | str, rank: int) -> float:
    """'2r' -> 2 * rank; a number stays as it is."""
    if isinstance(alpha, str):
        return float(alpha[:-1]) * rank
    return float(alpha)


def baseline_id(quantization: str, double_quant: bool) -> str:
    return f"{BASELINE_PREFIX}-{quantization_label(quantization, double_quant)}"


def is_baseline_id(run_id: str) -> bool:
    return run_id == BASELINE_PREFIX or run_id.startswith(f"{BASELINE_PREFIX}-")


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
    origin: str = "sweep",
) -> RunSpec:
    if ALL_LINEAR in modules and len(modules) > 1:
        raise ConfigError(f"modules {modules}: 'all-linear' cannot be combined with other modules")
    alpha = resolve_alpha(alpha_setting, rank)
    ordered = tuple(canonical_modules(modules))
    # Double quantization only exists for 4-bit weights; normalise it elsewhere.
    double_quant = double_quant if quantization in FOUR_BIT else False
    if not applies_compute_dtype(quantization):
        training = {key: value for key, value in training.items() if key != "compute_dtype"}
    return RunSpec(
        run_id=entry_id or run_id(rank, alpha, ordered, quantization, double_quant),
        rank=rank,
        alpha=alpha,
        modules=ordered,
        quantization=quantization,
        double_quant=double_quant,
        training=TrainingSettings.from_dict(training, origin),
    )


def _grid_specs(grid: dict[str, Any], training: dict[str, Any]) -> list[RunSpec]:
    axes = itertools.product(grid["rank"], grid["alpha"], grid["modules"], grid["quantization"], grid["double_quant"])
    return [
        _make_spec(None, rank, alpha, list(modules), quant, dq, training, "sweep.grids")
        for rank, alpha, modules, quant, dq in axes
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
        if is_baseline_id(spec.run_id):
            raise ConfigError(f"{origin}: run ids '{BASELINE_PREFIX}' and '{BASELINE_PREFIX}-*' name the baselines")
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
        if "compute_dtype" in entry["training"] and not applies_compute_dtype(entry["quantization"]):
            log.warning("sweep.runs[%d]: training.compute_dtype does not apply to %s weights (an unquantized run "
                        "computes in its weight dtype); ignored", index, entry["quantization"])  # fmt: skip
        spec = _make_spec(
            entry.get("id"),
            entry["rank"],
            entry["alpha"],
            list(entry["modules"]),
            entry["quantization"],
            entry["double_quant"],
            training,
            f"sweep.runs[{index}]",
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
                training=spec.training.replace(seed=seed),
            )
            runs[replica.run_id] = replica
    return runs


def baseline_specs(config: dict[str, Any], runs: dict[str, RunSpec]) -> dict[str, RunSpec]:
    """The base model without adapter, once per weight format the runs use (base-nf4, base-16bit, ...).

    Each run's gain is measured against the base model in its own format, and
    the bases side by side give the cost of quantizing the base model itself.
    """
    if not config["sweep"]["baseline"]:
        return {}
    baselines: dict[str, RunSpec] = {}
    for spec in runs.values():
        baselines.setdefault(
            spec.baseline_id,
            RunSpec(
                run_id=spec.baseline_id,
                rank=0,
                alpha=0.0,
                modules=(),
                quantization=spec.quantization,
                double_quant=spec.double_quant,
                training=None,
                is_baseline=True,
            ),
        )
    return baselines


def all_evaluated(config: dict[str, Any]) -> dict[str, RunSpec]:
    """Baselines, then the trained runs: everything that gets an eval_metrics.json."""
    runs = expand_study(config)
    return {**baseline_specs(config, runs), **runs}
