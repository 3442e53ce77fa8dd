"""One GPU per running job on a multi-GPU workstation.

Snakemake's `--resources gpu=N` only limits how many GPU jobs run at once; it
never sets CUDA_VISIBLE_DEVICES, so every job would land on GPU 0. Each GPU job
therefore claims a slot: an exclusive `flock` on one lock file per device. The
lock belongs to the process, so the kernel frees it when the job exits, however
it exits (a crash or SIGKILL included). Under SLURM the scheduler has already
chosen the device and nothing is claimed.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

DEFAULT_LOCK_DIR = Path(".snakemake") / "gpu-slots"


@dataclass
class GpuSlot:
    """A claimed device; keep the object alive for as long as the job uses it."""

    device: str
    handle: IO[str]


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


def try_claim(devices: list[str], lock_dir: Path) -> GpuSlot | None:
    """Lock the first free device, or None when all are taken."""
    lock_dir.mkdir(parents=True, exist_ok=True)
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
        return GpuSlot(device, handle)
    return None


def claim_gpu(
    lock_dir: Path = DEFAULT_LOCK_DIR, devices: list[str] | None = None, timeout_s: float = 3600, poll_s: float = 1.0
) -> GpuSlot | None:
    """Claim a device for this process and make it the only visible one.

    Call before CUDA is initialised. Returns None (and changes nothing) under
    SLURM or without GPUs. Waits while every device is taken (more jobs than
    GPUs were started) and fails after `timeout_s`.
    """
    # CUDA numbers devices fastest-first by default, NVML by PCI bus: make them agree
    # (set before CUDA starts), so the slot, the device and its memory readings match.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if os.environ.get("SLURM_JOB_ID"):
        return None
    candidates = visible_devices() if devices is None else devices
    if not candidates:
        return None
    deadline = time.monotonic() + timeout_s
    while (slot := try_claim(candidates, lock_dir)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {candidates} after {timeout_s:.0f} s ({lock_dir})")
        time.sleep(poll_s)
    os.environ["CUDA_VISIBLE_DEVICES"] = slot.device
    return slot


def job_environment(slot: GpuSlot | None) -> dict[str, str | None]:
    """Where the job ran: SLURM job id and node, the devices it saw, the slot it held."""
    return {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "hostname": os.uname().nodename,
        "gpu_slot": slot.device if slot else None,
    }
