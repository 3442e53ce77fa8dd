"""Expand the `sweep` section into run specifications with stable, readable ids."""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, replace
from decimal import Decimal
from typing import Any

from lora_study.core.formats import FOUR_BIT, applies_compute_dtype, quantization_label
from lora_study.study.budget import AUTO
from lora_study.study.config import ConfigError, load_schema, training_defaults
from lora_study.study.methods import CALIBRATED_METHODS, EVA, FULL, LORA, default_alpha, is_converted, method_problem
from lora_study.study.modules import ALL_LINEAR, canonical_modules, modules_label
from lora_study.study.settings import TrainingSettings

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
    method: str = LORA  # a name of lora_study.study.methods (full: fine-tuning without an adapter)
    # Per-layer rank and alpha (PEFT's rank_pattern / alpha_pattern, module-name regex -> value): the config's
    # rank_patterns entry named `rank_pattern`; "" for the uniform rank and alpha.
    rank_pattern: str = ""
    layer_ranks: tuple[tuple[str, int], ...] = ()
    layer_alphas: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.config_id:
            object.__setattr__(self, "config_id", self.run_id)

    def as_params(self) -> dict[str, Any]:
        """Plain data for Snakemake params and run tables.

        `method` appears only when it is not plain LoRA, so studies run before
        the method axis existed keep their params (and do not retrain).
        """
        params = asdict(self)
        params["modules"] = list(self.modules)
        params["training"] = self.training.to_dict() if self.training else None
        if self.method == LORA:
            del params["method"]
        if self.rank_pattern:  # its content too: editing the pattern retrains the run
            params["layer_ranks"], params["layer_alphas"] = dict(self.layer_ranks), dict(self.layer_alphas)
        else:
            for key in ("rank_pattern", "layer_ranks", "layer_alphas"):
                del params[key]
        return params

    @property
    def lora_patterns(self) -> dict[str, dict[str, float]]:
        """LoraConfig's rank_pattern and alpha_pattern (empty for a uniform run)."""
        return {"rank_pattern": dict(self.layer_ranks), "alpha_pattern": dict(self.layer_alphas)}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RunSpec:
        """The run again, from what as_params wrote (a rule script's params)."""
        values = dict(params)
        training = values.pop("training", None)
        values["modules"] = tuple(values["modules"])
        for key in ("layer_ranks", "layer_alphas"):
            values[key] = tuple(values.get(key, {}).items())
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

    @property
    def is_full(self) -> bool:
        """Full fine-tuning: every weight trained, no adapter."""
        return self.method == FULL


AUTO_ALPHA = "auto"


def resolve_alpha(alpha: float | str, rank: int, method: str = LORA) -> float:
    """'auto' -> the method's default (2r; rsLoRA: a constant), '2r' -> 2 * rank; a number stays as it is."""
    if alpha == AUTO_ALPHA:
        return default_alpha(method, rank)
    if isinstance(alpha, str):
        return float(alpha[:-1]) * rank
    return float(alpha)


def baseline_id(quantization: str, double_quant: bool) -> str:
    return f"{BASELINE_PREFIX}-{quantization_label(quantization, double_quant)}"


def is_baseline_id(run_id: str) -> bool:
    return run_id == BASELINE_PREFIX or run_id.startswith(f"{BASELINE_PREFIX}-")


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def compact_number(value: float) -> str:
    """Short, exact text for an id: 0.0002 -> 2e-4, 1.5e-05 -> 1.5e-5, 0.05 -> 0.05, 16 -> 16.

    Built from the float's shortest round-trip text, so two different values never share a name.
    """
    number = float(value)
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    text = repr(number)
    if abs(number) >= 0.01 and "e" not in text:
        return text
    sign, digits, exponent = Decimal(text).normalize().as_tuple()
    mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    return f"{'-' if sign else ''}{mantissa}e{exponent + len(digits) - 1}"


# Short names of training settings in run ids (a key without one is spelt out).
SETTING_ABBREVIATIONS = {
    "learning_rate": "lr",
    "lora_dropout": "drop",
    "max_steps": "steps",
    "epochs": "ep",
    "batch_size": "bs",
    "gradient_accumulation_steps": "ga",
    "weight_decay": "wd",
    "optimizer": "opt",
    "lr_scheduler": "sched",
    "warmup_steps": "warm",
    "max_grad_norm": "clip",
    "gradient_checkpointing": "gc",
    "group_by_length": "gbl",
    "attn_implementation": "attn",
    "compute_dtype": "cd",
    "memory_limit_gb": "mem",
    "train_examples": "ex",
}
# Settings that cannot be a grid axis, and what to use instead.
NOT_AN_AXIS = {"seed": "seeds are replicates of one configuration: set sweep.seeds"}


def setting_suffix(key: str, value: Any) -> str:
    """`lr2e-4`, `bs4`, `nogc`, `optadamw_8bit`: one swept setting in a run id."""
    name = SETTING_ABBREVIATIONS.get(key, key)
    if isinstance(value, bool):
        return name if value else f"no{name}"
    if value is None:
        return f"{name}none"
    if isinstance(value, int | float):
        return f"{name}{compact_number(value)}"
    return f"{name}{value}"


# Settings that say how a run is laid out on devices, not what it computes: never part of its id.
LAYOUT_SETTINGS = ("gpus",)
# Methods a sharded run (training.gpus > 1) trains: PiSSA/OLoRA convert their adapter through PEFT at save time,
# which reads the model's own (there sharded) weights.
SHARDED_METHODS = (LORA, "rslora", "dora", FULL)


def sharding_problem(method: str, training: dict[str, Any]) -> str | None:
    """Why a run cannot be sharded over training.gpus devices (None when it can, or is not sharded)."""
    gpus = training.get("gpus", 1)
    if gpus == 1 or gpus == AUTO:  # auto only chooses among the counts that pass these checks
        return None
    if method not in SHARDED_METHODS:
        why = ("its adapter is converted at save time" if is_converted(method)
               else "its initialisation reads each layer's inputs whole" if method in CALIBRATED_METHODS
               else "its initialisation reads each layer's whole 4-bit weight")  # fmt: skip
        return f"method {method} trains on one device only ({why})"
    if training.get("optimizer", "adamw") != "adamw":
        optimizer = training["optimizer"]
        return f"optimizer {optimizer}: bitsandbytes' 8-bit optimizers cannot update sharded parameters (use adamw)"
    if training["batch_size"] < training["gpus"]:
        return f"a batch of {training['batch_size']} rows cannot give each of {training['gpus']} devices a row"
    return None


def settings_suffix(own_settings: dict[str, Any], method: str = LORA) -> list[str]:
    """The id parts of a run's own (swept or overridden) settings that differ from the schema's defaults.

    Only the schema's defaults count, never the config's shared `training`
    block: editing a shared default changes what runs compute, not their names.
    """
    defaults = training_defaults(method)
    order = list(defaults)
    parts = []
    for key in sorted(own_settings, key=lambda k: order.index(k) if k in order else len(order)):
        if key not in LAYOUT_SETTINGS and own_settings[key] != defaults.get(key):
            parts.append(setting_suffix(key, own_settings[key]))
    return parts


def run_id(
    rank: int,
    alpha: float,
    modules: tuple[str, ...],
    quantization: str,
    double_quant: bool,
    method: str = LORA,
    own_settings: dict[str, Any] | None = None,
    rank_pattern: str = "",
) -> str:
    """`r16-qkvo-nf4`, `r16-qkvo-nf4-dora-lr2e-4`, `r16-qkvo-nf4-rpattn`, `full-16bit`.

    Alpha appears only when it is not the method's default; the method only
    when it is not LoRA; a rank pattern by its name (`rp<name>`); a swept
    setting only when it differs from the schema default.
    """
    if method == FULL:
        parts = [FULL, quantization_label(quantization, double_quant)]
    else:
        parts = [f"r{rank}"]
        if alpha != default_alpha(method, rank):
            parts.append(f"a{_format_number(alpha)}")
        parts.append(modules_label(modules))
        parts.append(quantization_label(quantization, double_quant))
        if method != LORA:
            parts.append(method)
        if rank_pattern:
            parts.append(f"{RANK_PATTERN_PREFIX}{rank_pattern}")
    parts += settings_suffix(own_settings or {}, method)
    return "-".join(parts)


@dataclass(frozen=True)
class Entry:
    """One run as a grid cell or a named run describes it, before defaults are resolved."""

    rank: int
    alpha: float | str
    modules: list[str]
    quantization: str
    double_quant: bool
    method: str
    own_settings: dict[str, Any]  # the training values this entry sets itself (grid axes or named overrides)
    explicit_id: str | None = None
    rank_pattern: str | None = None  # a name of the config's rank_patterns


# Every run id, generated or named (the schema's pattern for sweep.runs[].id).
RUN_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_+.-]*"
# A rank pattern's part of a run id: r16-qkvo-nf4-rp<name>.
RANK_PATTERN_PREFIX = "rp"


def _rank_pattern(entry: Entry, patterns: dict[str, Any], origin: str) -> dict[str, Any]:
    """The run's rank pattern as RunSpec fields (none for a uniform run), after checking it can apply."""
    name = entry.rank_pattern
    if not name:
        return {}
    if name not in patterns:
        known = ", ".join(sorted(patterns)) or "none defined"
        raise ConfigError(f"{origin}: rank_pattern '{name}' is not in the config's rank_patterns ({known})")
    if entry.method in (FULL, EVA):
        why = "trains every weight" if entry.method == FULL else "computes its own per-layer ranks"
        raise ConfigError(f"{origin}: rank_pattern '{name}' with method {entry.method}, which {why}")
    pattern = patterns[name]
    return {"rank_pattern": name, "layer_ranks": tuple(pattern.get("ranks", {}).items()),
            "layer_alphas": tuple(pattern.get("alphas", {}).items())}  # fmt: skip


def _make_spec(
    entry: Entry, shared: dict[str, Any], method_settings: dict[str, Any], origin: str, patterns: dict[str, Any]
) -> RunSpec:
    """Resolve an entry: schema and shared defaults, then the method's own settings, then the entry's."""
    problem = method_problem(entry.method, entry.quantization)
    if problem:
        raise ConfigError(f"{origin}: method '{entry.method}' with quantization '{entry.quantization}': {problem}")
    full = entry.method == FULL
    if not full and ALL_LINEAR in entry.modules and len(entry.modules) > 1:
        raise ConfigError(f"modules {entry.modules}: 'all-linear' cannot be combined with other modules")
    # Full fine-tuning has no rank, alpha or target modules: every grid cell collapses to one run.
    rank = 0 if full else entry.rank
    alpha = 0.0 if full else resolve_alpha(entry.alpha, rank, entry.method)
    ordered = () if full else tuple(canonical_modules(entry.modules))
    # Double quantization only exists for 4-bit weights; normalise it elsewhere.
    double_quant = entry.double_quant if entry.quantization in FOUR_BIT else False
    training = {**shared, **method_settings.get(entry.method, {}), **entry.own_settings}
    own = dict(entry.own_settings)
    if not applies_compute_dtype(entry.quantization):
        training.pop("compute_dtype", None)
        own.pop("compute_dtype", None)
    if full:
        own.pop("lora_dropout", None)  # no adapter: a dropout value must not name the run
    if problem := sharding_problem(entry.method, training):
        raise ConfigError(f"{origin}: training.gpus {training.get('gpus')}: {problem}")
    pattern = _rank_pattern(entry, patterns, origin)
    return RunSpec(
        run_id=entry.explicit_id
        or run_id(rank, alpha, ordered, entry.quantization, double_quant, entry.method, own, entry.rank_pattern or ""),
        rank=rank,
        alpha=alpha,
        modules=ordered,
        quantization=entry.quantization,
        double_quant=double_quant,
        training=TrainingSettings.from_dict(training, origin),
        method=entry.method,
        **pattern,
    )


def _grid_entries(grid: dict[str, Any], origin: str) -> list[Entry]:
    axes = grid.get("training", {})
    for key in axes:
        if key in NOT_AN_AXIS:
            raise ConfigError(f"config key '{origin}.training.{key}': {NOT_AN_AXIS[key]}")
    keys = list(axes)
    entries = []
    for rank, alpha, modules, quant, dq, method, pattern in itertools.product(
        grid["rank"], grid["alpha"], grid["modules"], grid["quantization"], grid["double_quant"], grid["method"],
        grid.get("rank_pattern", [None]),
    ):  # fmt: skip
        for values in itertools.product(*(axes[key] for key in keys)):
            own = dict(zip(keys, values, strict=True))
            entries.append(Entry(rank, alpha, list(modules), quant, dq, method, own, rank_pattern=pattern))
    return entries


def _describe_difference(first: RunSpec, second: RunSpec) -> str:
    """What two specs with one id differ in (their training settings, when that is all)."""
    if first.training is None or second.training is None:
        return ""
    a, b = first.training.to_dict(), second.training.to_dict()
    differing = [
        f"training.{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]
    if not differing or replace(first, training=second.training) != second:
        return ""
    return (
        f": they differ in {', '.join(differing)}, and an id names only swept values that differ from the "
        "schema's default (never the shared training block); sweep the same values in both places, or make "
        "one of them a named run with its own id"
    )


def _content(spec: RunSpec) -> RunSpec:
    """The configuration without its name: equal for grid cells that train the same thing."""
    return replace(spec, run_id="", config_id="")


def _merged_grid_cells(cells: list[tuple[RunSpec, str]]) -> list[tuple[RunSpec, str]]:
    """One spec per distinct configuration, in order of first appearance, named by its shortest id.

    A grid cell can repeat a configuration under another id (a swept value that equals the shared
    default: r16-qkvo-nf4 and r16-qkvo-nf4-lr2e-4). It trains once, and the name it gets does not
    depend on the order of the grids.
    """
    groups: dict[RunSpec, list[tuple[RunSpec, str]]] = {}
    for spec, origin in cells:
        groups.setdefault(_content(spec), []).append((spec, origin))
    merged = []
    for members in groups.values():
        spec, origin = min(members, key=lambda member: (len(member[0].run_id), member[0].run_id))
        others = sorted({m[0].run_id for m in members} - {spec.run_id})
        if others:
            log.info("%s: %s is the same configuration; trained once, as %s", origin, ", ".join(others), spec.run_id)
        merged.append((spec, origin))
    return merged


def _warn_unused_by_full(named: dict[str, Any], origin: str) -> None:
    """A named full fine-tuning run that sets rank, alpha, modules or LoRA dropout: they do not apply."""
    defaults = load_schema()["properties"]["sweep"]["properties"]["runs"]["items"]["properties"]
    ignored = [key for key in ("rank", "alpha", "modules") if named[key] != defaults[key]["default"]]
    ignored += ["training.lora_dropout"] if "lora_dropout" in named["training"] else []
    if ignored:
        log.warning("%s: %s do not apply to full fine-tuning (every weight trains, no adapter); ignored", origin,
                    ", ".join(ignored))  # fmt: skip


def expand_study(config: dict[str, Any]) -> dict[str, RunSpec]:
    """All runs of a validated config, by run id, in config order.

    Identical runs produced by several grids are merged; two different runs
    with one id are an error, as is an empty sweep.
    """
    sweep = config["sweep"]
    shared = config["training"]
    method_settings = config.get("methods", {})
    patterns = config.get("rank_patterns", {})
    runs: dict[str, RunSpec] = {}
    origins: dict[str, str] = {}

    def add(spec: RunSpec, origin: str) -> None:
        if is_baseline_id(spec.run_id):
            raise ConfigError(f"{origin}: run ids '{BASELINE_PREFIX}' and '{BASELINE_PREFIX}-*' name the baselines")
        previous = runs.get(spec.run_id)
        if previous is not None:
            raise ConfigError(
                f"duplicate run id '{spec.run_id}' from {origins[spec.run_id]} and {origin}"
                + _describe_difference(previous, spec)
            )
        runs[spec.run_id] = spec
        origins[spec.run_id] = origin

    cells = []
    for index, grid in enumerate(sweep["grids"]):
        origin = f"sweep.grids[{index}]"
        cells += [(_make_spec(entry, shared, method_settings, origin, patterns), origin)
                  for entry in _grid_entries(grid, origin)]  # fmt: skip
    for spec, origin in _merged_grid_cells(cells):
        add(spec, origin)
    for index, named in enumerate(sweep["runs"]):
        origin = f"sweep.runs[{index}]"
        if "compute_dtype" in named["training"] and not applies_compute_dtype(named["quantization"]):
            log.warning("%s: training.compute_dtype does not apply to %s weights (an unquantized run computes in "
                        "its weight dtype); ignored", origin, named["quantization"])  # fmt: skip
        if named["method"] == FULL:
            _warn_unused_by_full(named, origin)
        entry = Entry(named["rank"], named["alpha"], list(named["modules"]), named["quantization"],
                      named["double_quant"], named["method"], dict(named["training"]), named.get("id"),
                      named.get("rank_pattern"))  # fmt: skip
        add(_make_spec(entry, shared, method_settings, origin, patterns), origin)
    if not runs:
        raise ConfigError("config key 'sweep': no runs; add a grid or a named run")
    if sweep["seeds"]:
        if sweep.get("noise_replicates", 1) > 1:
            log.info("sweep.seeds replicates every configuration; sweep.noise_replicates is not needed and unused")
        return replicate(runs, sweep["seeds"])
    return with_noise_replicates(runs, sweep, method_settings, shared, patterns)


def noise_reference(sweep: dict[str, Any], runs: dict[str, RunSpec], method_settings: dict[str, Any],
                    shared: dict[str, Any], patterns: dict[str, Any]) -> str:  # fmt: skip
    """The configuration replicated to measure seed noise: sweep.noise_reference, else the centre of the
    first grid (the middle value of each of its axes; r16-qkvo-nf4 in the default study), else the first run."""
    named = sweep.get("noise_reference")
    if named:
        if named not in runs:
            raise ConfigError(f"config key 'sweep.noise_reference': '{named}' is not a run of this study "
                              f"(runs: {', '.join(list(runs)[:8])}{', ...' if len(runs) > 8 else ''})")  # fmt: skip
        return named
    if sweep["grids"]:
        centre = {key: [values[(len(values) - 1) // 2]] if isinstance(values, list) else values
                  for key, values in sweep["grids"][0].items() if key != "training"}  # fmt: skip
        axes = sweep["grids"][0].get("training", {})
        centre["training"] = {key: [values[(len(values) - 1) // 2]] for key, values in axes.items()}
        entries = _grid_entries(centre, "sweep.grids[0] (centre)")
        spec = _make_spec(entries[0], shared, method_settings, "sweep.grids[0] (centre)", patterns)
        if spec.run_id in runs:
            return spec.run_id
    return next(iter(runs))


def with_noise_replicates(runs: dict[str, RunSpec], sweep: dict[str, Any], method_settings: dict[str, Any],
                          shared: dict[str, Any], patterns: dict[str, Any]) -> dict[str, RunSpec]:  # fmt: skip
    """The runs plus sweep.noise_replicates - 1 more seeds of the reference configuration
    ('r16-qkvo-nf4-s1', '-s2', seeds training.seed + 1, ...): its seed-to-seed spread is the training noise
    every one-seed configuration's verdicts borrow. The reference's own run keeps its id (nothing retrains)."""
    replicates = sweep.get("noise_replicates", 1)
    if replicates < 2:
        return runs
    reference = runs[noise_reference(sweep, runs, method_settings, shared, patterns)]
    assert reference.training is not None
    extra = {}
    for offset in range(1, replicates):
        seed = reference.training.seed + offset
        replica = replace(reference, run_id=f"{reference.config_id}-s{seed}", training=reference.training.replace(
            seed=seed))  # fmt: skip
        if replica.run_id in runs:
            raise ConfigError(f"sweep.noise_replicates: run id '{replica.run_id}' is taken by another run")
        extra[replica.run_id] = replica
    return {**runs, **extra}


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
