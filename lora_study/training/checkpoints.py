"""Training checkpoints, so an interrupted run resumes instead of starting over.

A checkpoint holds what the next step depends on: the trainable (LoRA) weights,
the optimizer and scheduler state, torch's random number generators and the
progress so far (steps, tokens, loss curve). The data position needs no state
of its own: batches come from a seeded generator, so resuming at step s skips
s x accumulation batches. A fingerprint of the run's settings, the model and
the data guards against resuming into a run that has since changed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_study.core.io import atomic_path, read_json
from lora_study.study.config import canonical_json

log = logging.getLogger("lora_study")

FORMAT_VERSION = 2
WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "optimizer_scheduler_rng.pt"
PROGRESS_FILE = "progress.json"


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint.

    Time is the sum of the optimizer steps' own durations: saving checkpoints
    is counted apart (checkpoint_seconds), and the steady-state figures leave
    out the first steps of every process (see record_step).
    """

    step: int = 0
    train_tokens: int = 0
    loss_tokens: int = 0
    train_seconds: float = 0.0
    last_loss: float = math.nan
    curve: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0
    steady_steps: int = 0
    steady_seconds: float = 0.0
    steady_tokens: int = 0
    steady_loss_tokens: int = 0
    checkpoint_seconds: float = 0.0

    def record_step(self, steps_this_process: int, skip_first: int, seconds: float, tokens: int, loss_tokens: int):
        """Add one finished optimizer step; it counts as steady once this process is past `skip_first` steps."""
        self.train_seconds += seconds
        self.train_tokens += tokens
        self.loss_tokens += loss_tokens
        if steps_this_process > skip_first:
            self.steady_steps += 1
            self.steady_seconds += seconds
            self.steady_tokens += tokens
            self.steady_loss_tokens += loss_tokens

    def throughput(self) -> tuple[float, float, int]:
        """(tokens/s, loss tokens/s, steps measured): steady state, or every step when none was steady."""
        if self.steady_steps and self.steady_seconds > 0:
            return (self.steady_tokens / self.steady_seconds, self.steady_loss_tokens / self.steady_seconds,
                    self.steady_steps)  # fmt: skip
        if self.train_seconds <= 0:
            return math.nan, math.nan, 0
        return self.train_tokens / self.train_seconds, self.loss_tokens / self.train_seconds, self.step


def fingerprint(
    run: dict[str, Any], manifest: dict[str, Any], splits_dir: Path, recipe: dict[str, Any] | None = None
) -> str:
    """Changes whenever the run's settings, its resolved precision recipe, the model or the prepared data change."""
    data_files = sorted(
        (str(path.relative_to(splits_dir)), path.stat().st_size, path.stat().st_mtime_ns)
        for path in splits_dir.rglob("*")
        if path.is_file()
    )
    text = canonical_json(
        {"run": run, "recipe": recipe, "model": manifest, "data": data_files, "format": FORMAT_VERSION}
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Save and restore one run's training state in `directory`."""

    def __init__(self, directory: Path, run_fingerprint: str, every_steps: int) -> None:
        self.directory = Path(directory)
        self.fingerprint = run_fingerprint
        self.every_steps = every_steps

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, model: torch.nn.Module, optimizer, scheduler, progress: Progress, scaler=None) -> None:
        """Write the checkpoint under a temporary name and rename it into place; its time is counted apart."""
        started = time.perf_counter()
        with atomic_path(self.directory) as tmp:
            tmp.mkdir()
            save_file(_trainable_state(model), tmp / WEIGHTS_FILE)
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                     "scaler": scaler.state_dict() if scaler is not None else {}}  # fmt: skip
            torch.save(state, tmp / STATE_FILE)
            progress.checkpoint_seconds += time.perf_counter() - started
            record = {"fingerprint": self.fingerprint, "progress": asdict(progress)}
            (tmp / PROGRESS_FILE).write_text(canonical_json(record) + "\n")
        log.info("checkpoint saved at step %d: %s", progress.step, self.directory)

    def restore(self, model: torch.nn.Module, optimizer, scheduler, scaler=None) -> Progress | None:
        """Load the checkpoint into model, optimizer and scheduler; None if there is none to use."""
        progress_path = self.directory / PROGRESS_FILE
        if not progress_path.is_file():
            return None
        record = read_json(progress_path)
        if record.get("fingerprint") != self.fingerprint:
            log.warning("checkpoint %s belongs to other settings or data; starting over", self.directory)
            self.remove()
            return None
        weights = load_file(self.directory / WEIGHTS_FILE)
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                parameters[name].copy_(tensor)
        # weights_only: our own file, but never unpickle arbitrary objects.
        state = torch.load(self.directory / STATE_FILE, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(state.get("scaler") or {})
        _set_rng_state(state["rng"])
        progress = Progress(**record["progress"])
        progress.resumed_from_step = progress.step
        log.info("resuming from the checkpoint at step %d", progress.step)
        return progress

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class StopSignal:
    """Remembers a SIGTERM/SIGINT so training can stop at a step boundary.

    SLURM sends SIGTERM at a job's time limit or on preemption, some time
    before SIGKILL: enough to finish the current step and save a checkpoint.
    """

    def __init__(self) -> None:
        self.received: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[StopSignal]:
    stop = StopSignal()
    previous = {signum: signal.signal(signum, stop._handle) for signum in signals}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Interrupted(Exception):
    """A signal that arrived during work that may be abandoned (lora_study.measure.handoff: the training job's own
    evaluation), raised where the work was so that its caller carries on."""


@contextmanager
def signals_as_errors(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Inside the block a signal raises Interrupted, so a job whose outputs are written ends cleanly instead
    of being killed and losing them (Snakemake deletes the outputs of a failed job)."""

    def interrupt(signum: int, _frame: object) -> None:
        raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")

    previous = {signum: signal.signal(signum, interrupt) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class TrainingInterrupted(SystemExit):
    """Stopped by a signal after saving a checkpoint; the exit status says which signal."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


SHARDS_DIR = "shards"  # torch.distributed.checkpoint's files: each rank its shard of the weights and optimizer


def _rank_state_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


class ShardedCheckpointer(Checkpointer):
    """A sharded run's checkpoint: every rank writes its shard of the trainable weights and optimizer states
    (torch.distributed.checkpoint) and its random state; rank 0 the schedule and the progress. Saving and
    restoring are collectives: every rank calls them at the same step."""

    def __init__(self, directory: Path, run_fingerprint: str, every_steps: int, rank: int) -> None:
        super().__init__(directory, run_fingerprint, every_steps)
        self.rank = rank

    def _staging(self) -> Path:
        """A temporary folder beside the checkpoint, the same on every rank (rank 0 names it)."""
        import torch.distributed as dist

        name = [f".{self.directory.name}.{int(time.time() * 1e6)}" if self.rank == 0 else None]
        dist.broadcast_object_list(name, src=0)
        return self.directory.parent / str(name[0])

    def save(self, model: torch.nn.Module, optimizer, scheduler, progress: Progress, scaler=None) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        started = time.perf_counter()
        staging = self._staging()
        weights, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=staging / SHARDS_DIR)
        torch.save(_rng_state(), staging / _rank_state_file(self.rank))
        dist.barrier()
        if self.rank == 0:
            # The grad scaler is the same on every rank (its inf check is reduced over them).
            scaling = scaler.state_dict() if scaler is not None else {}
            torch.save({"scheduler": scheduler.state_dict(), "scaler": scaling}, staging / STATE_FILE)
            progress.checkpoint_seconds += time.perf_counter() - started
            record = {"fingerprint": self.fingerprint, "progress": asdict(progress)}
            (staging / PROGRESS_FILE).write_text(canonical_json(record) + "\n")
            shutil.rmtree(self.directory, ignore_errors=True)
            staging.rename(self.directory)  # the progress file last: a checkpoint without it is never used
            log.info("checkpoint saved at step %d: %s", progress.step, self.directory)
        dist.barrier()

    def restore(self, model: torch.nn.Module, optimizer, scheduler, scaler=None) -> Progress | None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        record = [None]
        if self.rank == 0 and (self.directory / PROGRESS_FILE).is_file():
            found = read_json(self.directory / PROGRESS_FILE)
            if found.get("fingerprint") == self.fingerprint:
                record = [found]
            else:
                log.warning("checkpoint %s belongs to other settings or data; starting over", self.directory)
                self.remove()
        dist.broadcast_object_list(record, src=0)
        if record[0] is None:
            return None
        options = StateDictOptions(ignore_frozen_params=True)
        weights, optimizer_state = get_state_dict(model, optimizer, options=options)
        state = {"model": weights, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=self.directory / SHARDS_DIR)
        # Only the trained weights were saved: the frozen base is not expected back.
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))  # fmt: skip
        shared = torch.load(self.directory / STATE_FILE, weights_only=True)
        scheduler.load_state_dict(shared["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(shared.get("scaler") or {})
        _set_rng_state(torch.load(self.directory / _rank_state_file(self.rank), weights_only=True))
        progress = Progress(**record[0]["progress"])
        progress.resumed_from_step = progress.step
        log.info("resuming from the checkpoint at step %d", progress.step)
        return progress

    def remove(self) -> None:
        if self.rank == 0:
            super().remove()


def any_rank_stopped(stop: StopSignal) -> bool:
    """Whether any rank of a sharded run received a stop signal: all stop (and checkpoint) at the same step."""
    import torch.distributed as dist

    flag = torch.tensor(1 if stop.received else 0)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not stop.received:
        stop.received = signal.SIGTERM  # another rank's signal: stop here as it does
    return bool(flag.item())
