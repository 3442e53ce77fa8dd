"""What every rule script does around its one call: logging, quiet progress bars,
and a failure that is written to the job's log before the job exits."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lora_study.core.errors import UserError
from lora_study.core.io import setup_logging


@contextmanager
def job(snakemake: Any, gpu: bool = False, work: str = "compute", devices: int = 1) -> Iterator[logging.Logger]:
    """Nothing here imports the ML stack: a job that never uses it does not pay for its import.

    `gpu`: a job that may use a GPU claims it here, first, before any import can initialise CUDA (or, with
    execution.device: cpu, hides the GPUs); `devices` of them (a sharded training run: job_gpus).

    `work`: the phase (lora_study.core.phases) of a job that marks none itself.
    """
    import time

    from lora_study.core import gpu_slots, phases, preload

    entered, age_s = time.perf_counter(), phases.process_age_s()
    # Byte-level progress bars make unreadable logs (our own progress lines remain), and transformers' warnings
    # down to errors: set before anything imports the libraries, which read them then (importing them here
    # would cost every job seconds, also the jobs that never use them).
    for name, value in preload.QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # Run in a child of the preloaded interpreter where one serves this workflow (returns here otherwise).
    preload.hand_over(age_s)
    age_s += preload.handed_over_age_s()

    if gpu:
        if (getattr(snakemake, "config", None) or {}).get("execution", {}).get("device") == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # execution.device: cpu hides the GPUs before anything sees them
        gpu_slots.claim_job_gpu(devices)
    log = setup_logging(snakemake.log[0] if snakemake.log else None)
    clock = phases.start(age_s, entered)
    if preload.process_kind() == "preloaded":
        log.info("forked from the preloaded interpreter (lora_study.core.preload)")
    try:
        yield log
    except UserError as error:
        # Bad input: one message naming the run or key and the fix, no traceback.
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception:
        log.exception("job failed")
        raise
    clock.finish(work)


def job_gpus(snakemake: Any) -> int:
    """Devices a training job claims: its run's training.gpus (read from its params: Snakemake scales the gpu
    resource down to a smaller --resources limit, the run's need stays; `auto`: the count its memory_plan param
    chose from plan.csv), else one. Only the train script asks: evaluate, deploy and downstream load a sharded
    run's adapter on one device."""
    import json

    params = getattr(snakemake, "params", None)
    run = json.loads(getattr(params, "run", None) or "{}") if params is not None else {}
    gpus = ((run or {}).get("training") or {}).get("gpus", 1)
    if gpus == "auto":
        return int((json.loads(getattr(params, "memory_plan", None) or "null") or {}).get("gpus", 1))
    return int(gpus)


def trained_run(snakemake: Any) -> tuple[Path | None, str]:
    """(adapter or weights folder, training status) of the job's run; (None, "ok") for a base model, which
    has no training inputs."""
    from lora_study.core.io import read_json

    if not hasattr(snakemake.input, "train_metrics"):
        return None, "ok"
    return Path(snakemake.input.adapter), read_json(snakemake.input.train_metrics)["status"]
