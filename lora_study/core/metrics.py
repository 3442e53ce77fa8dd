"""Metric records, the perplexity formula and peak-memory measurement."""

from __future__ import annotations

import math
import os
import resource
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
    # The precision recipe as resolved on this job's device (lora_study.training.precision).
    compute_dtype: str | None = None
    weight_format: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    capability: dict[str, Any] = field(default_factory=dict)
    torch_threads: int | None = None
    steps: int | None = None
    # Sum of the optimizer steps' durations (CUDA-synchronised), without checkpoint saving.
    train_wall_s: float | None = None
    checkpoint_s: float | None = None
    job_wall_s: float | None = None
    train_tokens: int | None = None
    loss_tokens: int | None = None
    # Steady state: the first measurement.skip_first_steps steps of each process left out.
    train_tokens_per_s: float | None = None
    loss_tokens_per_s: float | None = None
    throughput_steps: int | None = None
    loss_path: str | None = None
    lr_scheduler: str | None = None
    grad_scale: float | None = None
    final_train_loss: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_percent: float | None = None
    adapter_size_mb: float | None = None
    # Elements saved: a PiSSA/OLoRA adapter converted for the original base holds rank 2r; full
    # fine-tuning saves the whole model.
    adapter_params: int | None = None
    target_modules: list[str] | str = ""
    # MoE experts' 3-D weights adapted through PEFT's target_parameters.
    target_parameters: list[str] = field(default_factory=list)
    # Per requested group: the per-layer names PEFT wrapped and in how many decoder layers (modules.group_coverage).
    target_coverage: dict[str, Any] = field(default_factory=dict)
    # What attention ran: `auto` resolved for this model (sdpa, else eager).
    attn_implementation: str | None = None
    # Devices the run was sharded over (training.gpus); memory then holds the largest rank's peak as
    # peak_memory_gb and every rank's in rank_peak_memory_gb.
    gpus: int = 1
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
    compute_dtype: str | None = None
    weight_format: str | None = None
    capability: dict[str, Any] = field(default_factory=dict)
    loss_path: str | None = None
    eval_loss: float | None = None
    perplexity: float | None = None
    eval_tokens: int | None = None
    eval_tokens_per_s: float | None = None
    accuracy: float | None = None
    accuracy_n: int = 0
    accuracy_by_family: dict[str, float] = field(default_factory=dict)
    # Perplexity on general text the run was not trained on (evaluation.forgetting), and its scored tokens.
    general_perplexity: float | None = None
    general_tokens: int | None = None
    eval_wall_s: float | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] = field(default_factory=dict)
    evaluated_in: str = "evaluate job"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# An evaluation the training job ran on the model it held (lora_study.measure.handoff): the process's peak memory is
# training's, so evaluation's own is not measured there.
IN_TRAINING = "training job"


class PeakMemory:
    """Peak memory of this job, on the device it ran on - the job's own, never the whole device's.

    CUDA: NVML's per-process figure, sampled in a thread (it includes this
    process's CUDA context, which the run needs as much as its tensors); where
    the driver gives no per-process figure (MIG slices, containers with their
    own PID namespace) the device reading minus the reading when the job
    started; torch's max allocated / reserved in their own columns. CPU: the
    process's peak resident set size. `peak_memory_gb` is the headline figure
    and `memory_kind` says which of these it is.

    Create it before CUDA starts (the device reading at start excludes this job).
    """

    def __init__(self, device: torch.device, sample_interval_s: float = 0.05) -> None:
        self.device = device
        self.interval = sample_interval_s
        self.process_peak_bytes = 0
        self.device_peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = nvml_handle(device) if device.type == "cuda" else None
        self.device_at_start_bytes = _nvml_used(self._handle) if self._handle is not None else None
        # The training phase alone (after the load and the checks): what the planner predicts.
        self.training = False
        self.train_process_peak_bytes = 0
        self._job_max_allocated = self._job_max_reserved = self._job_peak_rss = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            if self._handle is not None:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        self.device_peak_bytes = max(self.device_peak_bytes, _nvml_used(self._handle) or 0)
        own = nvml_process_bytes(self._handle) or 0
        self.process_peak_bytes = max(self.process_peak_bytes, own)
        if self.training:
            self.train_process_peak_bytes = max(self.train_process_peak_bytes, own)

    def mark_training_start(self) -> None:
        """From here on, also track the training phase's own peak: the load and the logits check (which
        materialises full-vocabulary logits once) stay in the whole-job peak only."""
        if self.device.type == "cuda":
            self._job_max_allocated = torch.cuda.max_memory_allocated(self.device)
            self._job_max_reserved = torch.cuda.max_memory_reserved(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.train_process_peak_bytes = (nvml_process_bytes(self._handle) or 0) if self._handle is not None else 0
        else:
            self._job_peak_rss = peak_rss_bytes()  # resetting the peak resets getrusage's figure too
            return_freed_memory()
            reset_peak_rss()
        self.training = True

    def training_report(self) -> dict[str, Any]:
        """The training phase's peak, of the same kind as the headline figure; empty before training started."""
        if not self.training:
            return {}
        if self.device.type != "cuda":
            peak = current_peak_rss_bytes()
            return {"train_peak_memory_gb": peak / GB, "train_memory_kind": "cpu_peak_rss"} if peak else {}
        if self.train_process_peak_bytes:
            return {
                "train_peak_memory_gb": self.train_process_peak_bytes / GB,
                "train_memory_kind": "cuda_nvml_process",
            }
        return {"train_peak_memory_gb": torch.cuda.max_memory_reserved(self.device) / GB,
                "train_memory_kind": "cuda_torch_reserved"}  # fmt: skip

    def process_bytes_now(self) -> int | None:
        """What this job holds on its GPU now (per process, else device minus start), or None without NVML."""
        if self._handle is None:
            return None
        own = nvml_process_bytes(self._handle)
        if own is not None:
            return own
        return max(0, (_nvml_used(self._handle) or 0) - (self.device_at_start_bytes or 0))

    def report(self) -> dict[str, Any]:
        if self.device.type != "cuda":
            training = self.training_report()
            # getrusage and /proc's VmHWM round differently: the whole job's peak is never below the phase's.
            peak = max(self._job_peak_rss, peak_rss_bytes(), int(training.get("train_peak_memory_gb", 0) * GB))
            return {"peak_memory_gb": peak / GB, "memory_kind": "cpu_peak_rss", **training}
        if self._handle is not None:
            self.sample()
        training = self.training_report()
        allocated = max(self._job_max_allocated, torch.cuda.max_memory_allocated(self.device)) / GB
        reserved = max(self._job_max_reserved, torch.cuda.max_memory_reserved(self.device)) / GB
        at_start = self.device_at_start_bytes
        if self.process_peak_bytes:
            peak, kind = self.process_peak_bytes / GB, "cuda_nvml_process"
        elif self.device_peak_bytes and at_start is not None:
            peak, kind = (self.device_peak_bytes - at_start) / GB, "cuda_nvml_device_delta"
        else:
            peak, kind = reserved, "cuda_torch_reserved"
        return {
            "peak_memory_gb": peak,
            "memory_kind": kind,
            **training,
            "cuda_max_allocated_gb": allocated,
            "cuda_max_reserved_gb": reserved,
            "nvml_process_peak_gb": self.process_peak_bytes / GB if self.process_peak_bytes else None,
            "nvml_device_peak_gb": self.device_peak_bytes / GB if self.device_peak_bytes else None,
            "nvml_device_at_start_gb": at_start / GB if at_start is not None else None,
        }


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def return_freed_memory() -> None:
    """Hand what the load freed back to the OS (glibc keeps freed heap resident until trimmed), so the training
    phase's resident peak counts what training holds, not what loading left behind."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim this way
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (VmHWM) to its current size (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_peak_rss_bytes() -> int | None:
    """Peak resident set size since the last reset_peak_rss (VmHWM), or None where /proc has no figure."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def uuid_forms(uuid: str) -> list[str]:
    """NVML's names for the device torch reports `uuid` for: a whole GPU ("GPU-...") or a MIG instance
    ("MIG-..."); torch prints the bare UUID."""
    bare = uuid.removeprefix("GPU-").removeprefix("MIG-")
    return [f"GPU-{bare}", f"MIG-{bare}"]


def nvml_handle_for_uuid(nvml: Any, uuid: str | None) -> Any:
    """The NVML handle of the device with this UUID (GPU or MIG form), or None.

    Never by position: under cgroup-constrained SLURM a job's device 0 may be NVML's device 2, and on a
    MIG system an index names the parent GPU, whose memory other tenants share.
    """
    if not uuid:
        return None
    for name in uuid_forms(uuid):
        try:
            return nvml.nvmlDeviceGetHandleByUUID(name)
        except Exception:  # not this form (or not a device NVML knows)
            continue
    return None


def torch_device_uuid(device: torch.device) -> str | None:
    """The UUID CUDA reports for `device` (the job's own GPU or MIG instance), or None."""
    try:
        return str(torch.cuda.get_device_properties(device).uuid)
    except Exception:
        return None


def nvml_handle(device: torch.device) -> Any:
    """NVML handle of the job's CUDA device, found by its UUID, or None (no NVML, or no device NVML knows
    by that UUID: torch's own figures remain, and the memory kind says so)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # NVML missing or unsupported
        return None
    return nvml_handle_for_uuid(pynvml, torch_device_uuid(device))


def _nvml_used(handle: Any) -> int | None:
    try:
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


def nvml_process_bytes(handle: Any, pid: int | None = None) -> int | None:
    """GPU memory NVML attributes to process `pid` (this one by default); None where it cannot say."""
    try:
        import pynvml

        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return None
    pid = os.getpid() if pid is None else pid
    for process in processes:
        used = getattr(process, "usedGpuMemory", None)
        if process.pid == pid and isinstance(used, int):
            return used
    return None
