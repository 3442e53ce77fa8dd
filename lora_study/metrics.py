"""Metric records, the perplexity formula and peak-memory measurement."""

from __future__ import annotations

import math
import os
import resource
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

GB = 1024**3

STATUS_OK = "ok"


def perplexity(total_nll: float, token_count: int) -> float:
    """exp of the token-weighted mean negative log-likelihood (natural log)."""
    if token_count <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(total_nll / token_count)


@dataclass
class TrainMetrics:
    """Contents of train_metrics.json (also the runs-table column names).

    A run that did not train (status "oom" or "skipped") leaves the measured
    fields None and says why in `failure`.
    """

    run_id: str
    status: str
    device: str
    device_name: str
    torch_threads: int | None = None
    steps: int | None = None
    train_wall_s: float | None = None
    job_wall_s: float | None = None
    train_tokens: int | None = None
    loss_tokens: int | None = None
    train_tokens_per_s: float | None = None
    loss_tokens_per_s: float | None = None
    final_train_loss: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_percent: float | None = None
    adapter_size_mb: float | None = None
    target_modules: list[str] | str = ""
    resumed_from_step: int = 0
    memory: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] = field(default_factory=dict)
    # The planner's prediction for this run, made by the job before loading anything.
    memory_plan: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalMetrics:
    """Contents of eval_metrics.json; a run that did not train carries its status here."""

    run_id: str
    device: str
    status: str = STATUS_OK
    eval_loss: float | None = None
    perplexity: float | None = None
    eval_tokens: int | None = None
    eval_tokens_per_s: float | None = None
    accuracy: float | None = None
    accuracy_n: int = 0
    accuracy_by_family: dict[str, float] = field(default_factory=dict)
    eval_wall_s: float | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PeakMemory:
    """Peak memory of this job, on the device it ran on.

    CUDA: torch's max allocated / reserved, plus NVML device memory in use
    (sampled in a thread; it includes the CUDA context, which a GPU must hold
    too). CPU: the process's peak resident set size. `peak_memory_gb` is the
    headline figure and `memory_kind` says which of these it is.
    """

    def __init__(self, device: torch.device, sample_interval_s: float = 0.05) -> None:
        self.device = device
        self.interval = sample_interval_s
        self.nvml_peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            handle = _nvml_handle(self.device)
            if handle is not None:
                self._thread = threading.Thread(target=self._sample, args=(handle,), daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self, handle: Any) -> None:
        import pynvml

        while not self._stop.is_set():
            used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
            self.nvml_peak_bytes = max(self.nvml_peak_bytes, used)
            self._stop.wait(self.interval)

    def report(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            allocated = torch.cuda.max_memory_allocated(self.device) / GB
            reserved = torch.cuda.max_memory_reserved(self.device) / GB
            nvml = self.nvml_peak_bytes / GB if self.nvml_peak_bytes else None
            return {
                "peak_memory_gb": nvml if nvml is not None else reserved,
                "memory_kind": "cuda_nvml_used" if nvml is not None else "cuda_torch_reserved",
                "cuda_max_allocated_gb": allocated,
                "cuda_max_reserved_gb": reserved,
                "nvml_peak_used_gb": nvml,
            }
        return {"peak_memory_gb": peak_rss_bytes() / GB, "memory_kind": "cpu_peak_rss"}


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _nvml_handle(device: torch.device) -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
        # NVML numbers devices physically; map through CUDA_VISIBLE_DEVICES.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = [v for v in visible.split(",") if v.strip()]
        index = device.index or 0
        physical = int(ids[index]) if ids and ids[index].isdigit() else index
        return pynvml.nvmlDeviceGetHandleByIndex(physical)
    except Exception:  # NVML missing or unsupported: torch's figures remain
        return None
