"""The GPU slot allocator, on CPU: real processes, real file locks."""

import os
import signal
import subprocess
import sys
import time

import pytest

from lora_study.gpu_slots import claim_gpu, try_claim

HOLDER = """
import sys, time
from pathlib import Path
from lora_study.gpu_slots import claim_gpu
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
    holder = start_holder(tmp_path, devices="0")
    assert holder.stdout.readline().strip() == "0"
    assert try_claim(["0"], tmp_path) is None
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    slot = try_claim(["0"], tmp_path)
    assert slot is not None and slot.device == "0"


def test_a_waiting_job_gets_the_device_when_it_is_released(tmp_path):
    holder = start_holder(tmp_path, devices="0", hold_s=1.0)
    assert holder.stdout.readline().strip() == "0"
    started = time.monotonic()
    waiter = start_holder(tmp_path, devices="0", hold_s=0)
    assert waiter.stdout.readline().strip() == "0"
    assert time.monotonic() - started > 0.3  # it had to wait for the holder to exit
    holder.wait()
    waiter.wait()


def test_claim_sets_cuda_visible_devices_and_skips_under_slurm(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    slot = claim_gpu(tmp_path)
    assert slot.device == "2" and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert claim_gpu(tmp_path) is None and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert claim_gpu(tmp_path) is None  # no GPU: nothing to claim


def test_visible_devices_given_as_uuids_or_mig_ids_map_to_nvml_lookups(monkeypatch):
    from lora_study.metrics import nvml_lookup, visible_device_entry

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2c1a3e-0000-1111-2222-333344445555, 3,MIG-5a1b2c3d-aaaa-bbbb")
    assert nvml_lookup(visible_device_entry(0), 0) == ("uuid", "GPU-8f2c1a3e-0000-1111-2222-333344445555")
    assert nvml_lookup(visible_device_entry(1), 1) == ("index", 3)  # CUDA's device 1 is NVML's (PCI-ordered) 3
    assert nvml_lookup(visible_device_entry(2), 2) == ("uuid", "MIG-5a1b2c3d-aaaa-bbbb")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert nvml_lookup(visible_device_entry(0), 0) == ("index", 0)
    with pytest.raises(ValueError, match="neither an index nor"):
        nvml_lookup("gpu0", 0)


def test_claiming_a_gpu_makes_cuda_number_devices_like_nvml(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    slot = claim_gpu(lock_dir=tmp_path, devices=["1"])
    assert slot is not None and slot.device == "1"
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
