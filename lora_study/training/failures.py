"""Out-of-memory as a result: recognise it, cap memory to provoke it, record it.

A memory study runs configurations that may not fit. Running out of memory is
then a measurement ("does not fit"), not a crash; every other error still fails
the job.
"""

from __future__ import annotations

import errno
import gc
import logging
import re
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lora_study.core.metrics import GB, current_rss_bytes

log = logging.getLogger("lora_study")

STATUS_OOM = "oom"
STATUS_SKIPPED = "skipped"


class RankOutOfMemory(Exception):
    """A sharded run's rank ran out of memory and left its record for the launcher (the run's result, not a crash;
    lora_study.training.sharded)."""


# How allocation failures read when they arrive wrapped (safetensors, C++ allocators, OS errors).
OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "os error 12",
    "failed to allocate",
)


# cuBLAS reports an allocation failure as a status: directly, or as a handle it could not create
# (cublasCreate needs device memory for its workspace).
CUBLAS_OOM_STATUSES = ("cublas_status_alloc_failed",)
CUBLAS_CREATE_FAILED = ("cublas_status_not_initialized", "cublascreate")


def reads_as_out_of_memory(text: str) -> bool:
    """Whether an error message says an allocation failed (torch, the OS, cuBLAS), however it arrived."""
    message = text.lower()
    return (any(m in message for m in OOM_MESSAGES) or any(s in message for s in CUBLAS_OOM_STATUSES)
            or all(s in message for s in CUBLAS_CREATE_FAILED))  # fmt: skip


# Under an address-space cap a new thread's stack cannot be mapped either, a C function whose allocation the cap
# refused can return without raising (CPython then reports that, as a SystemError), and oneDNN, whose kernels are
# generated into freshly mapped memory, reports a refused mapping as a primitive it could not create (seen in a
# bf16 linear layer on an AVX2 machine and reproduced under RLIMIT_AS here).
CAPPED_ONLY_MESSAGES = (
    "can't start new thread",
    "returned NULL without setting an exception",
    "could not create a primitive",
)


def is_out_of_memory(error: BaseException | None, memory_capped: bool = False) -> bool:
    """True when `error`, or an error it was raised from, is an allocation failure.

    With `memory_capped` (a memory_limit_gb was in force), failing to start a
    thread counts too: its stack is an allocation the cap refused.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if memory_capped and any(m in str(error) for m in CAPPED_ONLY_MESSAGES):
            return True
        if isinstance(error, MemoryError | torch.OutOfMemoryError):
            return True
        if isinstance(error, OSError) and error.errno == errno.ENOMEM:
            return True
        if isinstance(error, RuntimeError | OSError) and reads_as_out_of_memory(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def memory_in_use_gb(device: torch.device) -> dict[str, float]:
    """Memory held right now: torch's allocator on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return {
            "cuda_allocated_gb": torch.cuda.memory_allocated(device) / GB,
            "cuda_reserved_gb": torch.cuda.memory_reserved(device) / GB,
        }
    return {"cpu_rss_gb": current_rss_bytes() / GB}


@contextmanager
def memory_cap(limit_gb: float | None, device: torch.device, memory: Any = None) -> Iterator[dict[str, Any]]:
    """Emulate a machine with `limit_gb` of memory for the code inside.

    CUDA: the caching allocator refuses to grow past the limit less what the
    job already holds outside it (its CUDA context, read from NVML through
    `memory`, a PeakMemory), so the cap bounds the same per-process figure the
    job reports as its peak, and an 80 GB card answers "does it fit in 8 GB?"
    with a real CUDA out-of-memory error. CPU: the
    process may map at most `limit_gb` more address space than it holds on
    entry (RLIMIT_AS; address space, not resident memory, is what Linux can
    cap). The limit is lifted on exit, so the failure can still be recorded.
    """
    if limit_gb is None:
        yield {}
        return
    # Everything heavy is imported first: an import the cap stops half-way leaves its modules broken, and the
    # next import then fails with an ImportError instead of the memory error it was.
    import peft  # noqa: F401  (imports transformers and bitsandbytes)

    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.zeros(1, device=device)  # creates the CUDA context, so it can be measured
        held = memory.process_bytes_now() if memory is not None else None
        outside_allocator = max(0, (held or 0) - torch.cuda.memory_reserved(device))
        allocator_limit = max(0, limit_gb * GB - outside_allocator)
        torch.cuda.set_per_process_memory_fraction(min(1.0, allocator_limit / total), device)
        log.info("memory cap: %.3g GB, of which %.2f GB are held outside torch's allocator (CUDA context)",
                 limit_gb, outside_allocator / GB)  # fmt: skip
        try:
            yield {"memory_limit_gb": limit_gb, "memory_limit_kind": "cuda_process_total",
                   "memory_outside_allocator_gb": outside_allocator / GB}  # fmt: skip
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return
    # OpenMP starts its worker threads at the first parallel operation, each with a stack mapped in the address
    # space: started under the cap, libgomp cannot create them and exits the process (no error to record).
    (torch.ones(512, 512) @ torch.ones(512, 512)).sum()
    torch.ones(1 << 22).mul_(2).sum()  # torch's own parallel_for, on all its threads
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space_bytes() + int(limit_gb * GB)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    log.info("memory cap: %.3g GB of address space beyond the current %.2f GB", limit_gb, _address_space_bytes() / GB)
    try:
        yield {"memory_limit_gb": limit_gb, "memory_limit_kind": "cpu_address_space_growth"}
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _address_space_bytes() -> int:
    """Virtual memory size of this process (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[0])
    return pages * resource.getpagesize()


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def oom_message(error: BaseException, limit_gb: float | None) -> str:
    """The error's first line, for a report; a failure only a memory cap causes says so (without addresses)."""
    text = first_line(error)
    if limit_gb is not None and any(m in text for m in CAPPED_ONLY_MESSAGES):
        return f"an allocation refused under the {limit_gb:g} GB memory cap ({re.sub(r' at 0x[0-9a-f]+', '', text)})"
    return text


@contextmanager
def oom_as_data(
    record: dict[str, Any], part: str, limit_gb: float | None = None, device: torch.device | None = None
) -> Iterator[None]:
    """Run one part of a job (under a `limit_gb` memory cap on `device`, see memory_cap); out of memory inside it
    is recorded as record["oom"][part] (the error's first line), the memory released and the job goes on to end
    normally, so the study's report still builds and says what did not fit. Any other error propagates."""
    try:
        with memory_cap(limit_gb, device or torch.device("cpu")):
            yield
    except Exception as error:
        if not is_out_of_memory(error, memory_capped=limit_gb is not None):
            raise
        message = oom_message(error, limit_gb)
        log.error("%s: out of memory (%s): recorded as data, the job goes on", part, message)
        record.setdefault("oom", {})[part] = message
    release_memory()


def release_memory() -> None:
    """Return what dropped models held (call after `del` of the last reference)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
