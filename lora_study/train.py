"""Train one LoRA/QLoRA adapter: read top to bottom, like the study's recipe."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_study.batching import IGNORE_INDEX, collate, endless_batches
from lora_study.budget import budget_verdict
from lora_study.checkpoints import Checkpointer, Progress, StopSignal, TrainingInterrupted, fingerprint, stop_on_signals
from lora_study.data import load_split
from lora_study.failures import STATUS_OOM, STATUS_SKIPPED, is_out_of_memory, memory_cap, memory_in_use_gb
from lora_study.gpu_slots import claim_gpu, job_environment
from lora_study.io import atomic_path, write_json
from lora_study.loading import (
    add_lora,
    count_parameters,
    device_name,
    load_base_model,
    load_tokenizer,
    pick_device,
    set_threads,
)
from lora_study.metrics import STATUS_OK, PeakMemory, TrainMetrics
from lora_study.modules import needs_fan_in_fan_out
from lora_study.planner import check_run, plan_for_run
from lora_study.sweep import BITSANDBYTES

log = logging.getLogger("lora_study")

LOSS_CURVE_FIELDS = ("step", "loss", "learning_rate", "tokens_seen", "elapsed_s")
# Marks the adapter directory of a run that did not train (status oom or skipped).
NOT_TRAINED_FILE = "NOT_TRAINED.json"


def total_steps(training: dict[str, Any], batches_per_epoch: int) -> int:
    """max_steps if set, else enough optimizer steps for `epochs` passes."""
    if training["max_steps"]:
        return int(training["max_steps"])
    if not training["epochs"]:
        raise ValueError("training: set max_steps or epochs")
    accumulation = training["gradient_accumulation_steps"]
    return max(1, math.ceil(training["epochs"] * batches_per_epoch / accumulation))


def _causal_lm(model):
    """The transformers CausalLM inside a PEFT wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _post_processes_logits(config) -> bool:
    # Some families scale or cap logits after lm_head; they take the plain path.
    return any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))


def make_optimizer(params: list[torch.nn.Parameter], training: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW with fp32 states, or bitsandbytes' 8-bit (optionally paged) AdamW."""
    settings = {"lr": training["learning_rate"], "weight_decay": training["weight_decay"]}
    if training["optimizer"] == "adamw":
        return torch.optim.AdamW(params, **settings)
    import bitsandbytes as bnb

    optimizers = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}
    return optimizers[training["optimizer"]](params, **settings)


def scored_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a next-token loss (response tokens after the first position)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def response_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over response tokens (float32), and their count.

    The output projection runs only at positions that carry a label: with short
    answers after long prompts that is a small fraction of the vocabulary-sized
    matmul, for the same loss.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    count = scored_tokens(batch)
    causal_lm = _causal_lm(model)
    if _post_processes_logits(causal_lm.config):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        selected = logits[:, :-1][keep]
    else:
        hidden = causal_lm.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        selected = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
    loss = F.cross_entropy(selected.float(), labels[keep], reduction="sum")
    return loss, count


def train_run(
    run: dict[str, Any],
    manifest: dict[str, Any],
    splits_dir: Path,
    adapter_dir: Path,
    metrics_path: Path,
    loss_curve_path: Path,
    threads: int,
    checkpoint_dir: Path,
    checkpoint_every: int = 0,
    plan_settings: dict[str, Any] | None = None,
) -> TrainMetrics:
    """Train the adapter for `run` (a RunSpec as params) and write its outputs.

    Out of memory ends the run with status "oom" (a result, not a crash); a
    run the memory plan marked as not fitting is recorded as "skipped" without
    loading anything. SIGTERM/SIGINT save a checkpoint and exit non-zero; the
    next attempt resumes from the newest checkpoint.
    """
    import peft  # noqa: F401  (imported before any memory cap, like everything heavy)
    from transformers import get_scheduler, set_seed

    job_start = time.perf_counter()
    training = run["training"]
    gpu_slot = claim_gpu()  # before CUDA starts: one device per concurrent job, held until return
    set_threads(threads)
    device = pick_device()
    log.info("run %s on %s, %d threads", run["run_id"], device_name(device), torch.get_num_threads())

    # Resolve modules before loading weights: a typo fails in a second, not after the load.
    targets = check_run(run, manifest["linear_layers"], manifest["model_type"])
    log.info("target modules %s -> %s", run["modules"], targets)
    outputs = TrainOutputs(adapter_dir, metrics_path, loss_curve_path)
    measured: dict[str, Any] = {}  # what is known about a run that stops early

    def not_trained(status: str, failure: dict[str, Any], progress: Progress) -> TrainMetrics:
        metrics = TrainMetrics(
            run_id=run["run_id"],
            status=status,
            device=device.type,
            device_name=device_name(device),
            target_modules=targets,
            job_wall_s=time.perf_counter() - job_start,
            environment=job_environment(gpu_slot),
            failure=failure,
            **measured,
        )
        return outputs.write_not_trained(metrics, progress.curve)

    train_rows = load_split(splits_dir, "train")
    lengths = [len(ids) for ids in train_rows["input_ids"]]
    plan = plan_for_run(run, manifest, lengths, list(train_rows["prompt_length"]), plan_settings)
    measured["memory_plan"] = plan.to_dict()
    verdict = budget_verdict(measured["memory_plan"], plan_settings) if plan_settings else None
    if verdict is not None:
        log.warning("skipped: predicted %.2f GB (%s), over the %.2f GB budget", verdict["predicted_gb"],
                    verdict["plan_device"], verdict["budget_gb"])  # fmt: skip
        return not_trained(STATUS_SKIPPED, {"reason": "predicted over the memory budget", **verdict}, Progress())
    log.info("memory plan: %.2f GB on CUDA, %.2f GB on CPU", plan.predicted_cuda_gb, plan.predicted_cpu_gb)
    _, pad_id = load_tokenizer(manifest)
    set_seed(training["seed"])  # after planning: everything random from here on is the run's own
    checkpointer = Checkpointer(checkpoint_dir, fingerprint(run, manifest, splits_dir), checkpoint_every)
    progress = Progress()
    phase = "load"
    memory: PeakMemory | None = None
    try:
        with memory_cap(training["memory_limit_gb"], device) as cap, PeakMemory(device) as memory:
            model = load_base_model(
                manifest,
                run["quantization"],
                run["double_quant"],
                training["compute_dtype"],
                training["attn_implementation"],
                device,
            )
            model = add_lora(
                model,
                targets,
                run["rank"],
                run["alpha"],
                training["lora_dropout"],
                needs_fan_in_fan_out(manifest["model_type"]),
                quantized=run["quantization"] in BITSANDBYTES,
                gradient_checkpointing=training["gradient_checkpointing"],
            )
            trainable, total = count_parameters(model)
            measured.update(trainable_params=trainable, total_params=total)
            log.info("trainable params %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)

            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = make_optimizer(params, training)
            batch_size = training["batch_size"]
            accumulation = training["gradient_accumulation_steps"]
            steps = total_steps(training, math.ceil(len(lengths) / batch_size))
            scheduler = get_scheduler(
                training["lr_scheduler"],
                optimizer,
                num_warmup_steps=training["warmup_steps"],
                num_training_steps=steps,
            )
            progress = checkpointer.restore(model, optimizer, scheduler) or progress
            # The batch stream is a pure function of the seed: resuming skips what was consumed.
            batches = itertools.islice(
                endless_batches(lengths, batch_size, training["seed"], training["group_by_length"]),
                progress.step * accumulation,
                None,
            )
            loader = torch.utils.data.DataLoader(
                train_rows.with_format(None),
                batch_sampler=batches,
                collate_fn=lambda rows: collate(rows, pad_id),
                num_workers=training["dataloader_num_workers"],
                # Its own generator: starting an iterator must not draw from the global RNG
                # (dropout's), or a resumed run would see different dropout masks.
                generator=torch.Generator().manual_seed(training["seed"]),
            )
            phase = "train"
            with stop_on_signals() as stop:
                _loop(model, params, optimizer, scheduler, iter(loader), steps, accumulation, device, training,
                      progress, checkpointer, stop)  # fmt: skip
    except Exception as error:
        if not is_out_of_memory(error, memory_capped=training["memory_limit_gb"] is not None):
            raise
        failure = {
            "phase": phase,
            "step": progress.step + 1 if phase == "train" else 0,
            "error": f"{type(error).__name__}: {error}"[:500],
            "memory_limit_gb": training["memory_limit_gb"],
            **{f"in_use_{key}": value for key, value in memory_in_use_gb(device).items()},
        }
        if memory is not None:
            measured["memory"] = memory.report()
        log.error("out of memory while %s (step %d): recorded as status 'oom'", phase, failure["step"])
        checkpointer.remove()
        return not_trained(STATUS_OOM, failure, progress)

    with atomic_path(adapter_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    _write_curve(loss_curve_path, progress.curve)
    adapter_mb = sum(f.stat().st_size for f in adapter_dir.glob("*.safetensors")) / 1e6
    metrics = TrainMetrics(
        run_id=run["run_id"],
        status=STATUS_OK,
        device=device.type,
        device_name=device_name(device),
        torch_threads=torch.get_num_threads(),
        steps=steps,
        train_wall_s=progress.train_seconds,
        job_wall_s=time.perf_counter() - job_start,
        train_tokens=progress.train_tokens,
        loss_tokens=progress.loss_tokens,
        train_tokens_per_s=progress.train_tokens / progress.train_seconds,
        loss_tokens_per_s=progress.loss_tokens / progress.train_seconds,
        final_train_loss=progress.last_loss,
        trainable_params=trainable,
        total_params=total,
        trainable_percent=100 * trainable / total,
        adapter_size_mb=adapter_mb,
        target_modules=targets,
        resumed_from_step=progress.resumed_from_step,
        memory={**memory.report(), **cap},
        memory_plan=measured["memory_plan"],
        environment=job_environment(gpu_slot),
    )
    write_json(metrics_path, metrics.to_dict())
    checkpointer.remove()  # the final outputs exist: nothing left to resume
    log.info(
        "done: %.1f s training, %.0f tokens/s, peak %.2f GB (%s)",
        progress.train_seconds,
        metrics.train_tokens_per_s,
        metrics.memory["peak_memory_gb"],
        metrics.memory["memory_kind"],
    )
    return metrics


def _loop(
    model,
    params,
    optimizer,
    scheduler,
    batches,
    steps: int,
    accumulation: int,
    device: torch.device,
    training: dict[str, Any],
    progress: Progress,
    checkpointer: Checkpointer,
    stop: StopSignal,
) -> None:
    """The optimisation loop from `progress.step` to `steps`; updates `progress` in place."""
    model.train()
    session_start = time.perf_counter()
    seconds_before = progress.train_seconds
    for step in range(progress.step + 1, steps + 1):
        micro_batches = [next(batches) for _ in range(accumulation)]
        # Token-weighted mean over the whole accumulated step, not a mean of means.
        step_tokens = sum(scored_tokens(b) for b in micro_batches)
        step_loss = 0.0
        for batch in micro_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum, _ = response_loss_sum(model, batch)
            (loss_sum / step_tokens).backward()
            step_loss += loss_sum.item()
            progress.train_tokens += int(batch["attention_mask"].sum())
        progress.loss_tokens += step_tokens
        torch.nn.utils.clip_grad_norm_(params, training["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.last_loss = step_loss / step_tokens
        if not math.isfinite(progress.last_loss):
            raise FloatingPointError(
                f"training loss is {progress.last_loss} at step {step}: the run diverged "
                f"(try a lower training.learning_rate than {training['learning_rate']})"
            )
        progress.step = step
        progress.train_seconds = seconds_before + time.perf_counter() - session_start
        progress.curve.append(
            {
                "step": step,
                "loss": progress.last_loss,
                "learning_rate": scheduler.get_last_lr()[0],
                "tokens_seen": progress.train_tokens,
                "elapsed_s": progress.train_seconds,
            }
        )
        if step % training["log_every"] == 0 or step == steps:
            log.info(
                "step %d/%d loss %.4f lr %.2e %.0f tokens/s",
                step,
                steps,
                progress.last_loss,
                scheduler.get_last_lr()[0],
                progress.train_tokens / progress.train_seconds,
            )
        if stop.received:
            checkpointer.save(model, optimizer, scheduler, progress)
            log.error("%s received: stopped after step %d; rerun the workflow to resume", stop.name, step)
            raise TrainingInterrupted(stop.received, step)
        if step < steps and checkpointer.due(step):
            checkpointer.save(model, optimizer, scheduler, progress)


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


def _write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOSS_CURVE_FIELDS)
        writer.writeheader()
        writer.writerows(curve)
