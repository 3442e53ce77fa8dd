"""One GPU per running job wherever a job can see several.

Snakemake's `--resources gpu=N` only limits how many GPU jobs run at once; it
never sets CUDA_VISIBLE_DEVICES, so every job would land on GPU 0. Each GPU job
therefore claims a slot: an exclusive `flock` on one lock file per device. The
lock belongs to the process, so the kernel frees it when the job exits, however
it exits (a crash or SIGKILL included). A job that sees one device (a SLURM job
given one GPU, a one-GPU machine) has nothing to choose and claims nothing; one
that sees several claims among them, SLURM or not (local Snakemake inside
`salloc --gpus=4`, grouped jobs). Locks live per host and per allocation.

The claim must come before anything initialises CUDA: CUDA reads
CUDA_VISIBLE_DEVICES once, at initialisation, and importing bitsandbytes (which
peft and transformers' quantization import) already queries every device. The
rule scripts of GPU jobs therefore claim first (`lora_study.core.jobs.job(gpu=True)`),
and a claim after CUDA started is refused.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LOCK_ROOT = Path(".snakemake") / "gpu-slots"


@dataclass
class GpuSlot:
    """Claimed devices (one, or N for a sharded run: `device` lists them comma-separated); keep the object alive
    for as long as the job uses them."""

    device: str
    handles: tuple[IO[str], ...]


def visible_devices() -> list[str]:
    """Devices this job may use: CUDA_VISIBLE_DEVICES if set, else all NVML devices."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no driver: a CPU machine
        return []


def try_claim(devices: list[str], lock_dir: Path, count: int = 1) -> GpuSlot | None:
    """Lock the first `count` free devices, or None (holding none) when fewer are free."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    taken: list[tuple[str, IO[str]]] = []
    for device in devices:
        handle = (lock_dir / f"gpu-{device}.lock").open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        taken.append((device, handle))
        if len(taken) == count:
            return GpuSlot(",".join(name for name, _ in taken), tuple(held for _, held in taken))
    for _, handle in taken:  # too few free: wait holding nothing, so two waiting jobs cannot deadlock
        handle.close()
    return None


def default_lock_dir() -> Path:
    """Per host and per SLURM allocation: device numbers mean something only on one machine, and two
    allocations on one node may both number their GPUs from 0."""
    return LOCK_ROOT / os.uname().nodename / os.environ.get("SLURM_JOB_ID", "local")


class CudaStartedError(RuntimeError):
    """CUDA was initialised before the job claimed its GPU: the claim could no longer choose the device."""


def cuda_initialized() -> bool:
    """Whether this process has initialised CUDA (without importing torch to find out)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def claim_gpu(
    lock_dir: Path | None = None,
    devices: list[str] | None = None,
    timeout_s: float = 3600,
    poll_s: float = 1.0,
    count: int = 1,
) -> GpuSlot | None:
    """Claim `count` devices for this process (a sharded run: its GPUs) and make them the only visible ones.

    Refused once CUDA is initialised. Returns None (and changes nothing) when
    at most `count` devices are visible (a SLURM job given exactly its GPUs).
    Waits while too few are free (more jobs than GPUs were started) and fails
    after `timeout_s`.
    """
    if cuda_initialized():
        raise CudaStartedError(
            "CUDA was initialised before this job claimed its GPU, so CUDA_VISIBLE_DEVICES can no longer choose "
            "the device: claim first (lora_study.core.jobs.job(snakemake, gpu=True)), before importing peft, "
            "bitsandbytes or anything that queries CUDA"
        )
    # CUDA numbers devices fastest-first by default, NVML by PCI bus: make them agree
    # (set before CUDA starts), so the slot, the device and its memory readings match.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    candidates = visible_devices() if devices is None else devices
    if len(candidates) <= count:
        return None
    lock_dir = default_lock_dir() if lock_dir is None else lock_dir
    deadline = time.monotonic() + timeout_s
    while (slot := try_claim(candidates, lock_dir, count)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {count} free GPUs among {candidates} after {timeout_s:.0f} s ({lock_dir})")
        time.sleep(poll_s)
    os.environ["CUDA_VISIBLE_DEVICES"] = slot.device
    return slot


_JOB_SLOT: list[GpuSlot | None] = []  # this process's claim, once made


def claim_job_gpu(count: int = 1) -> GpuSlot | None:
    """The job's GPUs: claimed on the first call (before CUDA starts), the same slot on every later one."""
    if not _JOB_SLOT:
        _JOB_SLOT.append(claim_gpu(count=count))
    return _JOB_SLOT[0]


def job_environment(slot: GpuSlot | None) -> dict[str, str | None]:
    """Where the job ran: SLURM job id and node, the devices it saw, the slot it held, and whether its process
    was forked from the preloaded interpreter (lora_study.core.preload: it changes a CPU job's resident set)."""
    from lora_study.core.preload import process_kind

    return {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "hostname": os.uname().nodename,
        "gpu_slot": slot.device if slot else None,
        "process": process_kind(),
    }
