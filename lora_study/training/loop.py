"""Train one LoRA/QLoRA adapter: plan, load, prepare, loop, write - each phase a few lines.

The precision recipe (lora_study.training.precision) decides what is held and computed
in which dtype; this module follows it.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_study.core import phases
from lora_study.core.errors import UserError
from lora_study.core.gpu_slots import GpuSlot, claim_job_gpu, job_environment
from lora_study.core.io import atomic_path, write_json
from lora_study.core.metrics import STATUS_OK, PeakMemory, TrainMetrics
from lora_study.prepare.data import first_rows, load_split
from lora_study.study.budget import AUTO, budget_verdict
from lora_study.study.methods import EVA, LOFTQ, is_converted
from lora_study.study.modules import (
    ModuleResolutionError,
    Targets,
    adapters_without_gradient,
    manifest_layout,
    resolve_attention,
)
from lora_study.study.preflight import check_run
from lora_study.study.settings import MeasurementSettings, TrainingSettings
from lora_study.study.sweep import RunSpec
from lora_study.training.batching import collate, endless_batches, total_steps
from lora_study.training.checkpoints import (
    Checkpointer,
    Progress,
    ShardedCheckpointer,
    StopSignal,
    TrainingInterrupted,
    any_rank_stopped,
    fingerprint,
    signals_as_errors,
    stop_on_signals,
)
from lora_study.training.failures import (
    STATUS_OOM,
    STATUS_SKIPPED,
    RankOutOfMemory,
    is_out_of_memory,
    memory_cap,
    memory_in_use_gb,
    release_memory,
)
from lora_study.training.initialisation import Calibration, calibration_batches, initialize_eva, initialize_loftq
from lora_study.training.loading import (
    add_lora,
    count_parameters,
    load_base_model,
    load_tokenizer,
    pick_device,
    prepare_full,
    set_threads,
)
from lora_study.training.loss import FULL_LOGITS, ResponseLoss, scored_tokens
from lora_study.training.planner import plan_for_run, with_gpus
from lora_study.training.precision import (
    DeviceCapability,
    GradScaling,
    Recipe,
    detect_capability,
    quiet_int8_casts,
    recipe_for,
)
from lora_study.training.sharded import Ranks

log = logging.getLogger("lora_study")

LOSS_CURVE_FIELDS = ("step", "loss", "learning_rate", "tokens_seen", "elapsed_s", "step_s")
# Marks the adapter directory of a run that did not train (status oom or skipped).
NOT_TRAINED_FILE = "NOT_TRAINED.json"


def scheduler_name(training: TrainingSettings) -> str:
    """The transformers schedule to build; `constant` with warm-up steps warms up (constant_with_warmup)."""
    if training.lr_scheduler == "constant" and training.warmup_steps > 0:
        return "constant_with_warmup"
    return training.lr_scheduler


def make_optimizer(params: list[torch.nn.Parameter], training: TrainingSettings) -> torch.optim.Optimizer:
    """AdamW with fp32 states, or bitsandbytes' 8-bit (optionally paged) AdamW."""
    settings = {"lr": training.learning_rate, "weight_decay": training.weight_decay}
    if training.optimizer == "adamw":
        return torch.optim.AdamW(params, **settings)
    import bitsandbytes as bnb

    optimizers = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}
    return optimizers[training.optimizer](params, **settings)


def synchronized_clock(device: torch.device) -> float:
    """perf_counter after the device finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class TrainOutputs:
    """The train rule's outputs; a run that did not train still gets all three."""

    adapter_dir: Path
    metrics_path: Path
    loss_curve_path: Path

    def write_not_trained(self, metrics: TrainMetrics, curve: list[dict[str, float]]) -> TrainMetrics:
        with atomic_path(self.adapter_dir) as tmp:
            tmp.mkdir()
            (tmp / NOT_TRAINED_FILE).write_text(json.dumps({"status": metrics.status}) + "\n")
        _write_curve(self.loss_curve_path, curve)
        write_json(self.metrics_path, metrics.to_dict())
        return metrics


# Called with the trained model, its job, the loss training computed (its checked path and prefix sharing), and
# the saved adapter's folder.
AfterTraining = Callable[[torch.nn.Module, "Job", ResponseLoss, Path], Any]


@dataclass
class Job:
    """Where and how this process trains: claimed device, its capability, the resolved recipe."""

    run: RunSpec
    gpu_slot: GpuSlot | None
    device: torch.device
    capability: DeviceCapability
    recipe: Recipe
    started: float
    memory: PeakMemory  # created before CUDA starts: the device reading at start excludes this job
    attn_implementation: str = "sdpa"  # resolved for the model once the manifest is read
    ranks: Ranks | None = None  # a sharded run's rank (lora_study.training.sharded); None on one device

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's outputs (always, unless it is a sharded run's rank > 0)."""
        return self.ranks is None or self.ranks.is_main

    @property
    def training(self) -> TrainingSettings:
        assert self.run.training is not None, "a baseline is never trained"
        return self.run.training

    def base_metrics(self, status: str, **fields: Any) -> TrainMetrics:
        return TrainMetrics(
            run_id=self.run.run_id,
            status=status,
            device=self.device.type,
            device_name=self.capability.name,
            compute_dtype=self.recipe.compute_dtype,
            weight_format=self.recipe.weight_format,
            recipe=self.recipe.to_dict(),
            capability=self.capability.to_dict(),
            job_wall_s=time.perf_counter() - self.started,
            environment=job_environment(self.gpu_slot),
            attn_implementation=self.attn_implementation,
            gpus=self.ranks.world if self.ranks else 1,
            **fields,
        )


def start_job(run: RunSpec, threads: int, ranks: Ranks | None = None) -> Job:
    """Claim a GPU (before CUDA starts), set threads, resolve the recipe for this device. A sharded run's rank
    takes its own GPU of the job's (the job claimed them) and joins the process group."""
    started = time.perf_counter()
    gpu_slot = None if ranks else claim_job_gpu()  # the rule script claimed it first; a direct call claims it here
    set_threads(threads)
    device = pick_device()
    if ranks is not None:
        if device.type == "cuda":
            if torch.cuda.device_count() < ranks.world:
                raise UserError(f"run '{run.run_id}' is sharded over {ranks.world} GPUs (training.gpus) but its job "
                                f"sees {torch.cuda.device_count()}: give it {ranks.world} (SLURM: --gpus; locally: "
                                "free GPUs, --resources gpu=N)")  # fmt: skip
            device = torch.device("cuda", ranks.local_rank)
            torch.cuda.set_device(device)
        from lora_study.training import sharded

        sharded.init(ranks, device)
    memory = PeakMemory(device)
    capability = detect_capability(device)
    assert run.training is not None
    recipe = recipe_for(run.quantization, run.training.compute_dtype, capability, full=run.is_full)
    log.info("run %s on %s, %d threads%s", run.run_id, capability.summary(), torch.get_num_threads(),
             f", rank {ranks.rank} of {ranks.world}" if ranks else "")  # fmt: skip
    log.info("recipe: %s (compute %s, autocast %s, grad scaler %s)", recipe.describe(), recipe.compute_dtype,
             recipe.autocast, recipe.grad_scaler)  # fmt: skip
    return Job(run, gpu_slot, device, capability, recipe, started, memory, ranks=ranks)


def train_run(
    run: RunSpec,
    manifest: dict[str, Any],
    splits_dir: Path,
    outputs: TrainOutputs,
    threads: int,
    checkpoint_dir: Path,
    checkpoint_every: int = 0,
    plan_settings: dict[str, Any] | None = None,
    measurement: MeasurementSettings | None = None,
    after_training: AfterTraining | None = None,
    ranks: Ranks | None = None,
    rank_failures: Path | None = None,
) -> TrainMetrics:
    """Train the adapter for `run` and write its outputs; then, when given, `after_training` gets the trained
    model (lora_study.measure.evaluate.InTrainingEvaluation) once the optimizer's memory is released.

    Out of memory ends the run with status "oom" (a result, not a crash); a
    run the memory plan marked as not fitting is recorded as "skipped" without
    loading anything. SIGTERM/SIGINT save a checkpoint and exit non-zero; the
    next attempt resumes from the newest checkpoint.
    """
    if run.training is not None and run.training.gpus == AUTO:  # the count its job was given (plan.csv's choice)
        run = with_gpus(run, ranks.world if ranks else 1)
    job = start_job(run, threads, ranks)  # claims the GPU first: importing peft queries CUDA
    import peft  # noqa: F401  (imported before any memory cap, like everything heavy)

    phases.end("imports")

    measurement = measurement or MeasurementSettings()
    # Resolve modules before loading weights: a typo fails in a second, not after the load.
    targets = check_run(run, manifest_layout(manifest), manifest["linear_layers"], manifest["model_type"])
    job.attn_implementation = resolve_attention(manifest, job.training.attn_implementation)
    if run.is_full:
        log.info("full fine-tuning (every weight trains); attention %s", job.attn_implementation)
    else:
        log.info("%s on target modules %s -> %s; attention %s", run.method, list(run.modules), targets.describe(),
                 job.attn_implementation)  # fmt: skip
    train_rows = first_rows(load_split(splits_dir, "train"), job.training.train_examples, run.run_id)
    if ranks is not None and 0 < len(train_rows) % job.training.batch_size < ranks.world:
        left = len(train_rows) % job.training.batch_size
        raise UserError(f"run '{run.run_id}': each epoch ends with a batch of {left} row(s) ({len(train_rows)} "
                        f"training rows, batch_size {job.training.batch_size}), too few for {ranks.world} devices: "
                        "choose a batch_size that divides the rows, or dataset.max_train_examples")  # fmt: skip
    plan = plan_for_run(run, manifest, train_rows, plan_settings, job.recipe, targets, job.attn_implementation)
    if plan["plan_error"]:
        log.warning("no memory plan for this run (the planner failed): %s", plan["plan_error"])
    verdict = budget_verdict(plan, plan_settings) if plan_settings else None
    if verdict is not None:
        log.warning("skipped: predicted %.2f GB (%s), over the %.2f GB budget", verdict["predicted_gb"],
                    verdict["plan_device"], verdict["budget_gb"])  # fmt: skip
        failure = {"reason": "predicted over the memory budget", **verdict}
        metrics = job.base_metrics(STATUS_SKIPPED, failure=failure, memory_plan=plan)
        return outputs.write_not_trained(metrics, []) if job.is_main else metrics
    log.info("memory plan: %.2f GB on CUDA, %.2f GB on CPU", plan["predicted_cuda_gb"], plan["predicted_cpu_gb"])
    phases.end("checks")

    from transformers import set_seed

    _, pad_id = load_tokenizer(manifest)
    set_seed(job.training.seed)  # after planning: everything random from here on is the run's own
    run_fingerprint = fingerprint(run.as_params(), manifest, splits_dir, job.recipe.to_dict())
    checkpointer = (
        Checkpointer(checkpoint_dir, run_fingerprint, checkpoint_every)
        if ranks is None
        else ShardedCheckpointer(checkpoint_dir, run_fingerprint, checkpoint_every, ranks.rank)
    )
    session = TrainingSession(job, checkpointer, measurement)
    try:
        with job.memory as memory, memory_cap(job.training.memory_limit_gb, job.device, memory) as cap:
            session.memory = memory
            model = session.load(
                manifest, targets, lambda: calibration_batches(train_rows, pad_id, job.training, job.device)
            )
            loader = session.prepare(model, train_rows, pad_id)
            phases.end("load")
            session.loop(model, loader)
            phases.end("compute")
    except Exception as error:
        if not is_out_of_memory(error, memory_capped=job.training.memory_limit_gb is not None):
            raise
        if ranks is not None and rank_failures is not None:
            # The other ranks wait in a collective this rank never joins: it stops (torchrun then stops them) and
            # leaves its record, which the launcher writes once as the run's result.
            from lora_study.training import sharded

            sharded.record_out_of_memory(rank_failures, ranks.rank, session.oom_metrics(error, plan).to_dict(),
                                         session.progress.curve)  # fmt: skip
            raise RankOutOfMemory() from error
        if ranks is not None:
            raise
        checkpointer.remove()
        metrics = session.oom_metrics(error, plan)
        return outputs.write_not_trained(metrics, session.progress.curve) if job.is_main else metrics
    metrics = session.write(model, outputs, {**memory.report(), **cap}, plan)
    if after_training is not None:
        phases.end("write")
        session.release()
        with signals_as_errors():  # a time limit's SIGTERM now ends the extra work, not the finished run
            after_training(model, job, session.loss, outputs.adapter_dir)
    return metrics


def train_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """train_run's arguments from the plain data a rule script (or a sharded run's launcher) passes on."""
    return dict(
        run=RunSpec.from_params(arguments["run"]),
        manifest=arguments["manifest"],
        splits_dir=Path(arguments["splits_dir"]),
        outputs=TrainOutputs(*(Path(path) for path in arguments["outputs"])),
        checkpoint_dir=Path(arguments["checkpoint_dir"]),
        checkpoint_every=arguments["checkpoint_every"],
        plan_settings=arguments["plan_settings"],
        measurement=MeasurementSettings.from_dict(arguments["measurement"]),
        # A sharded run's ranks leave an out-of-memory record here (lora_study.training.sharded.launch).
        rank_failures=Path(arguments["rank_failures"]) if arguments.get("rank_failures") else None,
    )


def wrapped_coverage(model: torch.nn.Module, manifest: dict[str, Any], run: RunSpec) -> dict[str, dict[str, Any]]:
    """What PEFT wrapped for each group the run asked for; a group that wrapped nothing stops the run, a group
    that reached only some layers (attention in a hybrid model) is logged and recorded."""
    from lora_study.study.modules import check_coverage, group_coverage, peft_wrapped

    num_layers = manifest.get("num_layers") or 0
    coverage = group_coverage(manifest_layout(manifest), run.modules, peft_wrapped(model), num_layers)
    for line in check_coverage(coverage, manifest["model_type"]):
        log.warning("only part of the model is adapted: %s", line)
    return coverage


class TrainingSession:
    """One process's training of one run: load, prepare, loop, write."""

    def __init__(self, job: Job, checkpointer: Checkpointer, measurement: MeasurementSettings) -> None:
        self.job = job
        self.checkpointer = checkpointer
        self.measurement = measurement
        self.progress = Progress()
        self.phase = "load"
        self.memory: PeakMemory | None = None
        self.counts: dict[str, int] = {}
        self.targets = Targets("")
        self.coverage: dict[str, dict[str, Any]] = {}  # per requested group: what PEFT wrapped, in how many layers
        self._gradients_checked = False  # whether the first backward reached every adapter
        self.steps = 0
        self.loss: ResponseLoss | None = None
        self.scaling = GradScaling(job.recipe, job.device.type)
        # PiSSA/OLoRA/CorDA/LoRA-GA: the adapter as initialised, to convert the trained one for the original base.
        self.initial_adapter: tempfile.TemporaryDirectory | None = None

    def load(
        self, manifest: dict[str, Any], targets: Targets, calibration: Calibration | None = None
    ) -> torch.nn.Module:
        """The base model in the run's format with LoRA on `targets`, cast to the recipe (full: all trainable);
        `calibration` gives the run's first training batches to the initialisations that read them."""
        run, training = self.job.run, self.job.training
        model = load_base_model(manifest, self.job.recipe, run.double_quant, self.job.attn_implementation,
                                self.job.device)  # fmt: skip
        if run.is_full:
            model = prepare_full(model, training.gradient_checkpointing)
        else:
            model = add_lora(model, self.job.recipe, targets, run.rank, run.alpha, training.lora_dropout,
                             training.gradient_checkpointing, run.method, calibration, run.lora_patterns)  # fmt: skip
        if run.method == LOFTQ:
            initialize_loftq(model, manifest["path"])
        if is_converted(run.method):
            self.initial_adapter = save_initial_adapter(model)
        trainable, total = count_parameters(model)
        self.counts = {"trainable_params": trainable, "total_params": total}
        self.targets = targets
        if not run.is_full:
            self.coverage = wrapped_coverage(model, manifest, run)
        log.info("trainable params %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)
        if self.job.ranks is not None:
            from lora_study.training import sharded

            sharded.shard(model)
            if self.job.ranks.rank > 0:  # the same initial weights everywhere; each rank its own dropout masks
                torch.manual_seed(training.seed + self.job.ranks.rank)
        return model

    def prepare(self, model: torch.nn.Module, train_rows, pad_id: int):
        """Optimizer, schedule and the batch stream, restored from a checkpoint when there is one."""
        training = self.job.training
        if self.job.run.method == EVA:  # before the optimizer and any checkpoint: EVA may change the factors' shapes
            initialize_eva(model, calibration_batches(train_rows, pad_id, training, self.job.device), self.job.recipe)
            trainable, total = count_parameters(model)
            self.counts = {"trainable_params": trainable, "total_params": total}
            log.info("trainable params after EVA %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, training)
        self.steps = total_steps(training, len(train_rows))
        schedule = scheduler_name(training)
        if schedule != training.lr_scheduler:
            log.warning("lr_scheduler constant with %d warm-up steps: using constant_with_warmup",
                        training.warmup_steps)  # fmt: skip
        from transformers import get_scheduler

        self.scheduler = get_scheduler(schedule, self.optimizer, num_warmup_steps=training.warmup_steps,
                                       num_training_steps=self.steps)  # fmt: skip
        ranks = self.job.ranks
        self.progress = self.checkpointer.restore(model, self.optimizer, self.scheduler, self.scaling) or Progress()
        lengths = [len(ids) for ids in train_rows["input_ids"]]
        # The batch stream is a pure function of the seed: resuming skips what was consumed.
        batches = itertools.islice(
            endless_batches(lengths, training.batch_size, training.seed, training.group_by_length),
            self.progress.step * training.gradient_accumulation_steps,
            None,
        )
        if ranks is not None:  # each rank its share of every global batch: the one-device run's rows and order
            batches = (rows[ranks.rank :: ranks.world] for rows in batches)
        # A sharded model gathers its root's weights (embeddings, head) in its own forward only: full logits.
        self.loss = ResponseLoss(model, FULL_LOGITS if ranks else None)
        return torch.utils.data.DataLoader(
            train_rows.with_format(None),
            batch_sampler=batches,
            collate_fn=lambda rows: collate(rows, pad_id),
            num_workers=training.dataloader_num_workers,
            # Its own generator: starting an iterator must not draw from the global RNG
            # (dropout's), or a resumed run would see different dropout masks.
            generator=torch.Generator().manual_seed(training.seed),
        )

    def loop(self, model: torch.nn.Module, loader) -> None:
        """Optimizer steps from the restored step to the last; each step is timed on its own."""
        self.phase = "train"
        if self.memory is not None:
            self.memory.mark_training_start()  # the planner predicts this phase: load and checks stay out
        model.train()
        batches = iter(loader)
        steps_this_process = 0
        with stop_on_signals() as stop, quiet_int8_casts():
            for step in range(self.progress.step + 1, self.steps + 1):
                started = synchronized_clock(self.job.device)
                loss_value, tokens, loss_tokens = self._step(model, [next(batches) for _ in range(self._accum)])
                seconds = synchronized_clock(self.job.device) - started
                steps_this_process += 1
                self.progress.record_step(steps_this_process, self.measurement.skip_first_steps, seconds, tokens,
                                          loss_tokens)  # fmt: skip
                self._after_step(model, step, loss_value, seconds, stop)

    @property
    def _accum(self) -> int:
        return self.job.training.gradient_accumulation_steps

    def _step(self, model, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, int, int]:
        """One optimizer step over the accumulated micro-batches: (mean loss, tokens, loss tokens)."""
        assert self.loss is not None
        # Token-weighted mean over the whole accumulated step (and every rank's share), not a mean of means.
        ranks = self.job.ranks
        step_tokens = sum(scored_tokens(b) for b in micro_batches)
        if ranks is not None:
            from lora_study.training import sharded

            step_tokens = sharded.total(step_tokens)
        # FSDP averages the ranks' gradients: N times each rank's part of the step's mean gives their sum.
        scale = ranks.world if ranks else 1
        step_loss, tokens = 0.0, 0
        for batch in micro_batches:
            batch = {k: v.to(self.job.device) for k, v in batch.items()}
            with self.job.recipe.autocast_context(self.job.device.type):
                loss_sum, _ = self.loss(batch)
            self.scaling.backward(loss_sum * scale / step_tokens)
            step_loss += loss_sum.item()
            tokens += int(batch["attention_mask"].sum())
        if ranks is not None:
            step_loss, tokens = sharded.total(step_loss), int(sharded.total(tokens))
        if not self._gradients_checked:
            self._refuse_adapters_without_gradient(model)
        self.scaling.unscale(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.job.training.max_grad_norm)
        self.scaling.step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss / step_tokens, tokens, step_tokens

    def _refuse_adapters_without_gradient(self, model: torch.nn.Module) -> None:
        """After the first backward: an adapter the forward pass never used would train nothing while the run
        reports it as trained."""
        self._gradients_checked = True
        unused = adapters_without_gradient(model)
        if unused:
            raise ModuleResolutionError(
                f"run '{self.job.run.run_id}': the adapters on {unused} got no gradient: the model reads those "
                "layers' weights directly (or never runs them on this data), so LoRA there would train nothing; "
                "leave them out of the modules"
            )

    def _after_step(self, model, step: int, loss: float, seconds: float, stop: StopSignal) -> None:
        """Record the step; log, stop on a signal, or checkpoint."""
        progress, training = self.progress, self.job.training
        progress.last_loss = loss
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss} at step {step}: the run diverged "
                f"(try a lower training.learning_rate than {training.learning_rate})"
            )
        progress.step = step
        lr = self.scheduler.get_last_lr()[0]
        progress.curve.append({"step": step, "loss": loss, "learning_rate": lr, "tokens_seen": progress.train_tokens,
                               "elapsed_s": progress.train_seconds, "step_s": seconds})  # fmt: skip
        if step % training.log_every == 0 or step == self.steps:
            log.info("step %d/%d loss %.4f lr %.2e %.2f s/step %.0f tokens/s", step, self.steps, loss, lr, seconds,
                     progress.train_tokens / progress.train_seconds)  # fmt: skip
        # A sharded run's ranks stop together, at the step the first of them was signalled.
        if any_rank_stopped(stop) if self.job.ranks is not None else stop.received:
            self.checkpointer.save(model, self.optimizer, self.scheduler, progress, self.scaling)
            log.error("%s received: stopped after step %d; rerun the workflow to resume", stop.name, step)
            raise TrainingInterrupted(stop.received, step)
        if step < self.steps and self.checkpointer.due(step):
            self.checkpointer.save(model, self.optimizer, self.scheduler, progress, self.scaling)

    def target_fields(self) -> dict[str, Any]:
        return {"target_modules": self.targets.modules, "target_parameters": list(self.targets.parameters),
                "target_coverage": self.coverage}  # fmt: skip

    def oom_metrics(self, error: Exception, plan: dict[str, Any]) -> TrainMetrics:
        training = self.job.training
        failure = {
            "phase": self.phase,
            "step": self.progress.step + 1 if self.phase == "train" else 0,
            "error": f"{type(error).__name__}: {error}"[:500],
            "memory_limit_gb": training.memory_limit_gb,
            **{f"in_use_{key}": value for key, value in memory_in_use_gb(self.job.device).items()},
        }
        log.error("out of memory while %s (step %d): recorded as status 'oom'", self.phase, failure["step"])
        memory = self.memory.report() if self.memory is not None else {}
        return self.job.base_metrics(STATUS_OOM, failure=failure, memory=memory, memory_plan=plan,
                                     **self.target_fields(), **self.counts)  # fmt: skip

    def release(self) -> None:
        """Drop the optimizer, its schedule and the batch stream once the outputs are written."""
        self.optimizer = self.scheduler = None
        self.params = []
        release_memory()

    def _gathered(self, model, memory: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """A sharded run's trained weights, whole, and its memory: the largest rank's peak, and every rank's.
        (Collectives: every rank calls this.) One device: nothing to gather."""
        if self.job.ranks is None:
            return None, memory
        from lora_study.training import sharded

        state = sharded.trainable_state(model, keep=self.job.is_main)
        reports = sharded.gathered(memory)
        peaks = [report["peak_memory_gb"] for report in reports]
        largest = {key: max(values) for key in ("train_peak_memory_gb",)
                   if (values := [r[key] for r in reports if r.get(key) is not None])}  # fmt: skip
        return state, {**memory, **largest, "peak_memory_gb": max(peaks), "rank_peak_memory_gb": peaks}

    def write(self, model, outputs: TrainOutputs, memory: dict[str, Any], plan: dict[str, Any]) -> TrainMetrics:
        """Adapter, loss curve and metrics; the checkpoint goes once they exist."""
        progress = self.progress
        state, memory = self._gathered(model, memory)
        if not self.job.is_main:
            return self.job.base_metrics(STATUS_OK)
        with atomic_path(outputs.adapter_dir) as tmp:
            save_trained(model, tmp, self.initial_adapter, state)
        _write_curve(outputs.loss_curve_path, progress.curve)
        tokens_per_s, loss_tokens_per_s, measured_steps = progress.throughput()
        trainable, total = self.counts["trainable_params"], self.counts["total_params"]
        metrics = self.job.base_metrics(
            STATUS_OK,
            torch_threads=torch.get_num_threads(),
            steps=self.steps,
            train_wall_s=progress.train_seconds,
            checkpoint_s=progress.checkpoint_seconds,
            train_tokens=progress.train_tokens,
            loss_tokens=progress.loss_tokens,
            train_tokens_per_s=tokens_per_s,
            loss_tokens_per_s=loss_tokens_per_s,
            throughput_steps=measured_steps,
            final_train_loss=progress.last_loss,
            trainable_params=trainable,
            total_params=total,
            trainable_percent=100 * trainable / total,
            adapter_size_mb=sum(f.stat().st_size for f in outputs.adapter_dir.glob("*.safetensors")) / 1e6,
            adapter_params=saved_parameters(outputs.adapter_dir),
            **self.target_fields(),
            resumed_from_step=progress.resumed_from_step,
            loss_path=self.loss.path if self.loss else None,
            lr_scheduler=scheduler_name(self.job.training),
            grad_scale=self.scaling.scale,
            memory=memory,
            memory_plan=plan,
        )
        write_json(outputs.metrics_path, metrics.to_dict())
        self.checkpointer.remove()  # the final outputs exist: nothing left to resume
        log.info("done: %.1f s in %d steps (%.1f s saving checkpoints), steady %.0f tokens/s over %d steps, "
                 "peak %.2f GB (%s)", progress.train_seconds, self.steps, progress.checkpoint_seconds, tokens_per_s,
                 measured_steps, memory["peak_memory_gb"], memory["memory_kind"])  # fmt: skip
        return metrics


INITIAL_ADAPTER = "initial"  # PEFT names the adapter it loads for the conversion after this folder


def save_initial_adapter(model) -> tempfile.TemporaryDirectory:
    """The PiSSA/OLoRA adapter before training, for PEFT's conversion at save time.

    Saved with init_lora_weights=True, as PEFT requires (loading it must not
    decompose the residual base again). A resumed run rebuilds the same
    initialisation (a deterministic decomposition of the same weights) and saves it again.
    """
    folder = tempfile.TemporaryDirectory(prefix="lora-init-")
    config = model.peft_config["default"]
    method, config.init_lora_weights = config.init_lora_weights, True
    model.save_pretrained(Path(folder.name) / INITIAL_ADAPTER, safe_serialization=True)
    config.init_lora_weights = method
    return folder


def save_trained(
    model, out_dir: Path, initial_adapter: tempfile.TemporaryDirectory | None, state: dict[str, Any] | None = None
) -> None:
    """The adapter (PiSSA/OLoRA: converted for the original base, rank 2r) or, for full fine-tuning, the
    whole model as its fp32 master weights (as trained: a 16-bit copy would round away small updates,
    which the anatomy step measures as weight differences)."""
    conversion = {}
    if initial_adapter is not None:
        conversion["path_initial_model_for_weight_conversion"] = str(Path(initial_adapter.name) / INITIAL_ADAPTER)
    if state is not None:  # a sharded model: its weights gathered whole
        conversion["state_dict"] = state
    model.save_pretrained(out_dir, safe_serialization=True, **conversion)


def saved_parameters(folder: Path) -> int:
    """Elements stored in a folder's safetensors files (a converted adapter holds rank 2r)."""
    from safetensors import safe_open

    count = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                count += math.prod(handle.get_slice(name).get_shape())
    return count


def _write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOSS_CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(curve)
