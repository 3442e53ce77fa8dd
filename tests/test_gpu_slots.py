"""The GPU slot allocator, on CPU: real processes, real file locks."""

import os
import signal
import subprocess
import sys
import time

import pytest

from lora_study.core.gpu_slots import claim_gpu, try_claim

HOLDER = """
import sys, time
from pathlib import Path
from lora_study.core.gpu_slots import claim_gpu
slot = claim_gpu(Path(sys.argv[1]), devices=sys.argv[2].split(","), timeout_s=600, poll_s=0.05)  # a hang guard
print(slot.device, flush=True)
time.sleep(float(sys.argv[3]))
"""


def start_holder(lock_dir, devices="0,1", hold_s=30.0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_dir), devices, str(hold_s)], stdout=subprocess.PIPE, text=True, env=env
    )


def test_two_concurrent_jobs_get_different_devices(tmp_path):
    first, second = start_holder(tmp_path), start_holder(tmp_path)
    try:
        devices = {first.stdout.readline().strip(), second.stdout.readline().strip()}
        assert devices == {"0", "1"}
        assert try_claim(["0", "1"], tmp_path) is None  # both taken
    finally:
        first.kill()
        second.kill()


def test_a_killed_job_frees_its_device(tmp_path):
    holders = [start_holder(tmp_path), start_holder(tmp_path)]
    taken = {holder.stdout.readline().strip(): holder for holder in holders}
    assert set(taken) == {"0", "1"} and try_claim(["0", "1"], tmp_path) is None
    taken["0"].send_signal(signal.SIGKILL)
    taken["0"].wait()
    slot = try_claim(["0", "1"], tmp_path)
    assert slot is not None and slot.device == "0"
    taken["1"].kill()


def test_a_sharded_job_claims_its_devices_together_or_none(tmp_path):
    """A job that trains on two devices locks two free ones; with one free it holds nothing and waits, so two
    such jobs on a three-GPU machine cannot each hold one and wait for the other."""
    holder = start_holder(tmp_path)
    assert holder.stdout.readline().strip() == "0"
    assert try_claim(["0", "1", "2"], tmp_path, count=3) is None
    pair = try_claim(["0", "1", "2"], tmp_path, count=2)
    assert pair is not None and pair.device == "1,2" and len(pair.handles) == 2
    assert try_claim(["0", "1", "2"], tmp_path) is None  # all three held
    del pair  # closing the handles releases the locks
    import gc

    gc.collect()
    assert try_claim(["1", "2"], tmp_path, count=2).device == "1,2"
    holder.kill()


def test_a_waiting_job_gets_a_device_when_one_is_released(tmp_path):
    holders = [start_holder(tmp_path, hold_s=1.0), start_holder(tmp_path, hold_s=1.0)]
    assert {holder.stdout.readline().strip() for holder in holders} == {"0", "1"}
    started = time.monotonic()
    waiter = start_holder(tmp_path, hold_s=0)
    assert waiter.stdout.readline().strip() in {"0", "1"}
    assert time.monotonic() - started > 0.3  # it had to wait for a holder to exit
    for process in (*holders, waiter):
        process.wait()


def test_claims_among_several_visible_devices_under_slurm_too_and_never_with_one(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    slot = claim_gpu(tmp_path)
    assert slot.device == "2" and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    # Inside an allocation of several GPUs (salloc --gpus=2, then local Snakemake): still one per job.
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    slot = claim_gpu(tmp_path / "alloc")
    assert slot.device == "0" and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert claim_gpu(tmp_path / "alloc", devices=["0", "1"]).device == "1"  # a second job of the allocation
    # One visible device (a SLURM job given one GPU, a one-GPU machine): nothing to choose, nothing claimed.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert claim_gpu(tmp_path) is None and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert claim_gpu(tmp_path) is None  # no GPU: nothing to claim


def test_locks_are_per_host_and_per_allocation(monkeypatch):
    from lora_study.core.gpu_slots import default_lock_dir

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    local = default_lock_dir()
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert default_lock_dir() != local and default_lock_dir().parts[-2:] == (os.uname().nodename, "17")


class MachineNvml:
    """NVML's view of a machine: devices in PCI order, each known by its UUID (GPU-... or MIG-...)."""

    def __init__(self, uuids: list[str]):
        self.uuids = uuids

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:  # NVML's name
        if uuid not in self.uuids:
            raise LookupError(uuid)
        return self.uuids.index(uuid)  # the handle: here, NVML's own index of the device

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index


def test_the_jobs_gpu_is_found_by_the_uuid_cuda_reports_never_by_position(monkeypatch):
    from lora_study.core.metrics import nvml_handle_for_uuid

    machine = MachineNvml(["GPU-aaaa-0", "GPU-bbbb-1", "GPU-cccc-2", "MIG-dddd-3"])
    # Cgroup-renumbered: the job sees one device, its "0", which is NVML's device 2; CUDA reports its UUID bare.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert nvml_handle_for_uuid(machine, "cccc-2") == 2
    # An index in CUDA_VISIBLE_DEVICES does not matter either: the UUID decides.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert nvml_handle_for_uuid(machine, "aaaa-0") == 0
    # Given in either form; a MIG instance is found as itself, not as its parent GPU.
    assert nvml_handle_for_uuid(machine, "GPU-bbbb-1") == 1
    assert nvml_handle_for_uuid(machine, "dddd-3") == 3
    # A UUID NVML does not know (or none): no handle, so no other device's memory is read.
    assert nvml_handle_for_uuid(machine, "eeee-9") is None and nvml_handle_for_uuid(machine, None) is None


def test_claiming_a_gpu_makes_cuda_number_devices_like_nvml(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert claim_gpu(lock_dir=tmp_path) is None  # one device: nothing claimed, but the order is set all the same
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


# Runs a rule script as Snakemake would, up to the moment its job claims a GPU, and prints which
# CUDA-touching modules were imported by then.
CLAIM_PROBE = """
import runpy, sys, types
import lora_study.core.gpu_slots as slots

def probe(count=1):
    loaded = [m for m in ("bitsandbytes", "peft", "transformers", "transformers.integrations.bitsandbytes")
              if m in sys.modules]
    torch = sys.modules.get("torch")
    print("CLAIM", ",".join(loaded) or "-", bool(torch and torch.cuda.is_initialized()), flush=True)
    raise SystemExit(0)

slots.claim_job_gpu = probe
snakemake = types.SimpleNamespace(log=[], params=None, input=None, output=None, threads=1, config={})
runpy.run_path(sys.argv[1], init_globals={"snakemake": snakemake}, run_name="__main__")
print("NO CLAIM", flush=True)
"""


@pytest.mark.parametrize("rule", ["train", "evaluate", "deploy", "downstream"])
def test_gpu_jobs_claim_their_gpu_before_anything_can_touch_cuda(rule):
    from conftest import REPO, run_guarded

    result = run_guarded([sys.executable, "-c", CLAIM_PROBE, str(REPO / "scripts" / f"{rule}.py")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "CLAIM - False", result.stdout


def test_a_claim_after_cuda_started_is_refused(tmp_path, monkeypatch):
    import torch

    from lora_study.core.gpu_slots import CudaStartedError

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(CudaStartedError, match="claim first"):
        claim_gpu(tmp_path, devices=["0", "1"])


def test_gpus_torch_cannot_use_stop_the_job_in_seconds_with_the_fix(monkeypatch):
    from lora_study.core.errors import UserError
    from lora_study.training import loading

    # This machine has no GPU: torch.cuda.is_available() is False here, as under a driver too old for the build.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(loading, "gpu_evidence", lambda: (["NVIDIA H100 80GB HBM3"] * 2, "535.104.05"))
    with pytest.raises(UserError) as error:
        loading.pick_device()
    message = str(error.value)
    assert "2 GPUs (NVIDIA H100 80GB HBM3)" in message and "driver is 535.104.05" in message
    assert f"torch {loading.torch.__version__}" in message and "CUDA_VISIBLE_DEVICES=''" in message
    # The message names the build's CUDA and the driver it needs.
    text = loading.unusable_gpu_message(["A100"], "535.104.05", "2.13.0", "13.0")
    assert "built for CUDA 13.0, which needs NVIDIA driver >= 580; this machine's driver is 535.104.05" in text
    assert "CPU-only build" in loading.unusable_gpu_message(["A100"], "550.54", "2.13.0+cpu", None)
    # Hidden GPUs, or none at all: the CPU, quietly.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert loading.pick_device().type == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(loading, "gpu_evidence", lambda: ([], None))
    assert loading.pick_device().type == "cpu"


def test_a_gpu_without_kernels_in_the_torch_build_is_refused():
    from lora_study.core.errors import UserError
    from lora_study.training.loading import check_kernels

    arch = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    for capability in ((7, 5), (8, 0), (8, 9), (9, 0), (12, 1)):  # T4, A100, L4 (sm_86 runs 8.9), H100, newer
        check_kernels(capability, arch, "gpu")
    with pytest.raises(UserError, match=r"Tesla V100 \(compute capability 7\.0\) has no kernels"):
        check_kernels((7, 0), arch, "Tesla V100")
    check_kernels((7, 0), ["sm_75", "compute_70"], "Tesla V100")  # PTX for 7.0 compiles for it


DEVICE_PROBE = """
import os, runpy, sys, types
import lora_study.core.gpu_slots as slots

def probe(count=1):
    print("VISIBLE", repr(os.environ.get("CUDA_VISIBLE_DEVICES")), flush=True)
    raise SystemExit(0)

slots.claim_job_gpu = probe
config = {"execution": {"device": sys.argv[2]}}
snakemake = types.SimpleNamespace(log=[], params=None, input=None, output=None, threads=1, config=config)
runpy.run_path(sys.argv[1], init_globals={"snakemake": snakemake}, run_name="__main__")
"""


def test_execution_device_cpu_hides_the_gpus_before_the_claim():
    from conftest import REPO, run_guarded

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
    for device, visible in (("cpu", "''"), ("auto", "'0,1'")):
        command = [sys.executable, "-c", DEVICE_PROBE, str(REPO / "scripts" / "train.py"), device]
        result = run_guarded(command, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.splitlines()[-1] == f"VISIBLE {visible}", result.stdout


def test_a_job_claims_as_many_devices_as_its_run_is_sharded_over():
    """From the run's params, not the gpu resource: Snakemake scales that down to a smaller --resources limit."""
    import json
    import types

    from lora_study.core.jobs import job_gpus

    def job_of(training: dict | None):
        params = types.SimpleNamespace(run=json.dumps({"run_id": "r", "training": training}))
        return types.SimpleNamespace(params=params, resources={"gpu": 1})

    assert job_gpus(job_of({"gpus": 2, "batch_size": 8})) == 2
    assert job_gpus(job_of({"batch_size": 8})) == 1  # one device: params carry no gpus
    assert job_gpus(job_of(None)) == 1  # a base model's evaluation
    assert job_gpus(types.SimpleNamespace(params=None)) == 1
    assert job_gpus(types.SimpleNamespace(params=types.SimpleNamespace())) == 1  # a rule without run params
