"""One run on N devices as one job: torchrun starts N processes, each holds a shard of the model (FSDP2's
fully_shard, per decoder layer and at the root) and trains on its share of every global batch.

The result is the one-device run's: each global batch (the same rows, in the same order) is split between the
ranks, the loss of every rank is divided by the tokens of the whole step (summed over the ranks) and scaled by
N, because FSDP averages the ranks' gradients. Quantized bases shard their 4-bit weights in a float storage
dtype (bitsandbytes' quant_storage), as FSDP-QLoRA does. Rank 0 writes the run's outputs; the adapter it saves is
gathered from the shards, so evaluate and any PEFT client load it as a one-device adapter.

On a machine without GPUs the processes talk over gloo on the CPU (each with its share of the job's threads);
with GPUs over NCCL, one GPU each.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_study.core import phases

log = logging.getLogger("lora_study")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a sharded run."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def decoder_layers(model) -> list:
    """The repeated blocks to shard one by one: the ModuleList as long as the config's decoder layers (not a
    mixture-of-experts layer's list of experts, which can be longer), else the longest."""
    import torch.nn as nn

    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    config = getattr(model, "config", None)
    layers = getattr(config.get_text_config(), "num_hidden_layers", None) if config is not None else None
    matching = [module for module in lists if len(module) == layers]
    return list((matching or sorted(lists, key=len, reverse=True) or [[]])[0])


def shard(model) -> None:
    """FSDP2: each decoder layer its own unit (gathered for its forward and backward only), the rest at the root."""
    from torch.distributed.fsdp import fully_shard

    model.train()  # bitsandbytes repacks a 4-bit weight for inference at its first forward in eval mode
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)


def init(ranks: Ranks, device) -> None:
    import torch.distributed as dist

    # With GPUs, NCCL for the model's tensors and gloo for the small CPU tensors the loop reduces (tokens, stop).
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world)


def total(value: float | int) -> float:
    """`value` summed over the ranks."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())


def gathered(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def trainable_state(model, keep: bool) -> dict[str, Any]:
    """The trained parameters, whole, by their one-device names. Every rank gathers (a collective); only the rank
    that `keep`s them holds the copy (full fine-tuning: the whole model)."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if hasattr(param, "full_tensor") else param
            if keep:
                state[name] = whole.detach().cpu()
    return state


# --- the job's side: start the ranks, wait for them ----------------------------------------------------------


def record_out_of_memory(failures_dir: Path, rank: int, metrics: dict[str, Any], curve: list[dict[str, float]]) -> None:
    """A rank's out-of-memory record, for the launcher to write once as the run's outputs."""
    from lora_study.core.io import write_json

    write_json(failures_dir / f"rank{rank}.json", {"metrics": {**metrics, "failure": {**metrics["failure"],
               "rank": rank}}, "curve": curve})  # fmt: skip


def out_of_memory_records(failures_dir: Path) -> list[dict[str, Any]]:
    """The ranks' out-of-memory records, lowest rank first."""
    paths = sorted(failures_dir.glob("rank*.json"), key=lambda path: int(path.stem.removeprefix("rank")))
    return [json.loads(path.read_text()) for path in paths]


def launch(arguments: dict[str, Any], gpus: int, threads: int, log_path: str | None) -> None:
    """Run `arguments` (train_run's, as plain data) on `gpus` processes and wait. A rank that runs out of memory
    ends the run with status "oom" (written once, here); any other failed rank fails the job."""
    failures_dir = Path(tempfile.mkdtemp(prefix="rank-failures-"))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({**arguments, "log_path": log_path, "rank_failures": str(failures_dir)}, handle)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={gpus}",
        "-m", "lora_study.training.sharded", handle.name,
    ]  # fmt: skip
    # Each rank gets its share of the job's threads (CPU: the ranks run side by side on the same cores).
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // gpus))}
    log.info("sharded over %d processes (FSDP2): %s", gpus, " ".join(command[2:]))
    process = subprocess.Popen(command, env=env)
    # A time limit's SIGTERM (or Ctrl-C) goes on to torchrun, which passes it to the ranks: they finish the step,
    # checkpoint together and exit; this job waits for them and fails, so the retry resumes.
    forwarded = {signum: signal.signal(signum, lambda received, _: process.send_signal(received))
                 for signum in (signal.SIGTERM, signal.SIGINT)}  # fmt: skip
    try:
        returncode = process.wait()
    finally:
        for signum, handler in forwarded.items():
            signal.signal(signum, handler)
        Path(handle.name).unlink(missing_ok=True)
        phases.end("ranks")  # the ranks' time: rank 0 logs its own phases (imports, load, compute, ...)
    try:
        records = out_of_memory_records(failures_dir)
    finally:
        shutil.rmtree(failures_dir, ignore_errors=True)
    if returncode != 0 and records:
        _write_out_of_memory(arguments, records)
    elif returncode != 0:
        raise RuntimeError(f"the sharded run's processes ended with exit status {returncode}; see the log above")


def _write_out_of_memory(arguments: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """The run's outputs from the first rank that ran out of memory (the others were stopped with it)."""
    from lora_study.core.metrics import TrainMetrics
    from lora_study.training.loop import train_arguments

    outputs = train_arguments(arguments)["outputs"]
    first = records[0]
    metrics = TrainMetrics(**first["metrics"])
    metrics.failure["ranks_out_of_memory"] = [record["metrics"]["failure"]["rank"] for record in records]
    shutil.rmtree(arguments["checkpoint_dir"], ignore_errors=True)  # as a one-device run's out of memory does
    outputs.write_not_trained(metrics, first["curve"])
    log.error("rank %s ran out of memory: the run is recorded as status 'oom'", metrics.failure["rank"])


def main(arguments_path: str) -> None:
    """A rank: set up logging and the process group, then train (lora_study.training.loop.train_run)."""
    import torch.distributed as dist

    from lora_study.core.errors import UserError
    from lora_study.core.io import setup_logging
    from lora_study.training.failures import RankOutOfMemory
    from lora_study.training.loop import train_arguments, train_run

    entered, age_s = time.perf_counter(), phases.process_age_s()
    arguments = json.loads(Path(arguments_path).read_text())
    ranks = Ranks.from_env()
    # Rank 0 writes the job's log; the others only their warnings and errors, to the same log.
    setup_logging(arguments["log_path"], level=logging.INFO if ranks.is_main else logging.WARNING,
                  prefix="" if ranks.is_main else f"rank {ranks.rank}: ", append=True)  # fmt: skip
    clock = phases.start(age_s, entered) if ranks.is_main else None
    try:
        train_run(**train_arguments(arguments), threads=int(os.environ.get("OMP_NUM_THREADS", "1")), ranks=ranks)
        if clock is not None:
            clock.finish("write")
    except SystemExit:
        raise  # stopped by a signal after the checkpoint (logged where it happened)
    except UserError as error:  # bad input: one line that names the run and the fix, as a one-device job says it
        log.error("%s", error)
        raise SystemExit(1) from None
    except RankOutOfMemory:  # (imported from failures: this module runs as __main__ in a rank)
        raise SystemExit(1) from None  # recorded for the launcher (the rank logged where it happened)
    except BaseException:
        failures_dir = Path(arguments["rank_failures"]) if arguments.get("rank_failures") else None
        if failures_dir is not None and out_of_memory_records(failures_dir):  # a collective with a dead rank
            log.warning("rank %d stopped: another rank ran out of memory", ranks.rank)
            raise SystemExit(1) from None
        log.exception("rank %d of %d failed", ranks.rank, ranks.world)  # in the job's log, not only torchrun's
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
