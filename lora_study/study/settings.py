"""Typed, frozen training settings: a misspelt or missing key fails when a run is built, not at step 0."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from lora_study.study.config import ConfigError


@dataclass(frozen=True)
class TrainingSettings:
    """One run's `training` section (config/schema.yaml documents every key and its default)."""

    max_steps: int | None
    epochs: float | None
    learning_rate: float
    lr_scheduler: str
    warmup_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    group_by_length: bool
    attn_implementation: str
    dataloader_num_workers: int
    # None for runs it does not apply to (unquantized weights compute in their own dtype).
    compute_dtype: str | None
    lora_dropout: float
    optimizer: str
    weight_decay: float
    max_grad_norm: float
    seed: int
    log_every: int
    memory_limit_gb: float | None
    # Devices the run is sharded over, or "auto" (a layout: never in the run id; in params only when not 1).
    gpus: int | str = 1
    # Train on the first N prepared training rows (None: all; in params only when set, so studies from before
    # keep theirs).
    train_examples: int | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "training") -> TrainingSettings:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        missing = sorted(names - set(values) - {"compute_dtype", "gpus", "train_examples"})
        if unknown:
            raise ConfigError(f"{where}: unknown training settings {unknown}")
        if missing:
            raise ConfigError(f"{where}: missing training settings {missing}")
        return cls(**{"compute_dtype": None, **values})

    def to_dict(self) -> dict[str, Any]:
        """Plain data; compute_dtype only where it applies, gpus only when the run is sharded (so a one-device
        run's params, and every study finished before sharding existed, stay as they were)."""
        values = asdict(self)
        if values["compute_dtype"] is None:
            del values["compute_dtype"]
        if values["gpus"] == 1:
            del values["gpus"]
        if values["train_examples"] is None:
            del values["train_examples"]
        return values

    def replace(self, **changes: Any) -> TrainingSettings:
        return TrainingSettings.from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class MeasurementSettings:
    """How throughput is measured (config section `measurement`)."""

    skip_first_steps: int = 2

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> MeasurementSettings:
        return cls(**(values or {}))


# The settings an evaluate job uses, one definition for the rule's params and for the training job that
# evaluates its own model (lora_study.measure.handoff).
EVALUATION_KEYS = ("batch_size", "generation_batch_size", "exact_match_examples", "max_new_tokens")


def evaluation_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The evaluation settings of an evaluate job: turning on lm-eval, the merge check or serving reruns only
    their own jobs."""
    settings = {key: config["evaluation"][key] for key in EVALUATION_KEYS}
    if forgetting_enabled(config):  # only when on: studies without it keep their recorded params
        forgetting = dict(config["evaluation"]["forgetting"])
        if forgetting["source"] != "python-docs":  # a local file: its content, so an edit reruns the evaluations
            forgetting["digest"] = file_digest(forgetting["source"])
        settings["forgetting"] = forgetting
    return settings


def file_digest(path: str) -> str | None:
    import hashlib
    import os

    if not os.path.exists(path):
        return None  # the evaluation says so
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def forgetting_enabled(config: dict[str, Any]) -> bool:
    """Whether evaluations also score the general text (evaluation.forgetting.source)."""
    return config["evaluation"].get("forgetting", {}).get("source") is not None


def compute_settings(quantization: str, training: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Settings evaluation shares with training: how the base model is computed (compute_dtype only for
    bitsandbytes weights, so a 16-bit baseline does not rerun when it changes), and the memory cap of the
    jobs after training (evaluation.memory_limit_gb), only when set, so studies without one keep their
    recorded params (no reruns)."""
    from lora_study.core.formats import applies_compute_dtype

    keys = ("compute_dtype", "attn_implementation") if applies_compute_dtype(quantization) else ("attn_implementation",)
    settings = {key: training[key] for key in keys}
    if config["evaluation"]["memory_limit_gb"] is not None:
        settings["memory_limit_gb"] = config["evaluation"]["memory_limit_gb"]
    return settings
