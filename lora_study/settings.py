"""Typed, frozen training settings: a misspelt or missing key fails when a run is built, not at step 0."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from lora_study.config import ConfigError


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

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "training") -> TrainingSettings:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        missing = sorted(names - set(values) - {"compute_dtype"})
        if unknown:
            raise ConfigError(f"{where}: unknown training settings {unknown}")
        if missing:
            raise ConfigError(f"{where}: missing training settings {missing}")
        return cls(**{"compute_dtype": None, **values})

    def to_dict(self) -> dict[str, Any]:
        """Plain data; compute_dtype only where it applies."""
        values = asdict(self)
        if values["compute_dtype"] is None:
            del values["compute_dtype"]
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
