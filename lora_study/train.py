"""Train one LoRA/QLoRA adapter: read top to bottom, like the study's recipe."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_study.batching import IGNORE_INDEX, collate, endless_batches
from lora_study.data import load_split
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
from lora_study.modules import needs_fan_in_fan_out, resolve_target_modules
from lora_study.sweep import BITSANDBYTES

log = logging.getLogger("lora_study")

LOSS_CURVE_FIELDS = ("step", "loss", "learning_rate", "tokens_seen", "elapsed_s")


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
) -> TrainMetrics:
    """Train the adapter for `run` (a RunSpec as params) and write its outputs."""
    from transformers import get_scheduler, set_seed

    job_start = time.perf_counter()
    training = run["training"]
    gpu_slot = claim_gpu()  # before CUDA starts: one device per concurrent job, held until return
    set_threads(threads)
    set_seed(training["seed"])
    device = pick_device()
    log.info("run %s on %s, %d threads", run["run_id"], device_name(device), torch.get_num_threads())

    # Resolve modules before loading weights: a typo fails in a second, not after the load.
    targets = resolve_target_modules(manifest["model_type"], run["modules"], manifest["linear_layers"])
    log.info("target modules %s -> %s", run["modules"], targets)

    train_rows = load_split(splits_dir, "train")
    lengths = [len(ids) for ids in train_rows["input_ids"]]
    _, pad_id = load_tokenizer(manifest)

    with PeakMemory(device) as memory:
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
        log.info("trainable params %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=training["learning_rate"], weight_decay=training["weight_decay"])
        batch_size = training["batch_size"]
        accumulation = training["gradient_accumulation_steps"]
        steps = total_steps(training, math.ceil(len(lengths) / batch_size))
        scheduler = get_scheduler(
            training["lr_scheduler"],
            optimizer,
            num_warmup_steps=training["warmup_steps"],
            num_training_steps=steps,
        )
        batches = endless_batches(lengths, batch_size, training["seed"], training["group_by_length"])
        loader = torch.utils.data.DataLoader(
            train_rows.with_format(None),
            batch_sampler=batches,
            collate_fn=lambda rows: collate(rows, pad_id),
            num_workers=training["dataloader_num_workers"],
        )
        curve, train_tokens, loss_tokens, train_seconds, last_loss = _loop(
            model, params, optimizer, scheduler, iter(loader), steps, accumulation, device, training
        )

    with atomic_path(adapter_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    _write_curve(loss_curve_path, curve)
    adapter_mb = sum(f.stat().st_size for f in adapter_dir.glob("*.safetensors")) / 1e6
    metrics = TrainMetrics(
        run_id=run["run_id"],
        status=STATUS_OK,
        device=device.type,
        device_name=device_name(device),
        torch_threads=torch.get_num_threads(),
        steps=steps,
        train_wall_s=train_seconds,
        job_wall_s=time.perf_counter() - job_start,
        train_tokens=train_tokens,
        loss_tokens=loss_tokens,
        train_tokens_per_s=train_tokens / train_seconds,
        loss_tokens_per_s=loss_tokens / train_seconds,
        final_train_loss=last_loss,
        trainable_params=trainable,
        total_params=total,
        trainable_percent=100 * trainable / total,
        adapter_size_mb=adapter_mb,
        target_modules=targets,
        memory=memory.report(),
        environment=job_environment(gpu_slot),
    )
    write_json(metrics_path, metrics.to_dict())
    log.info(
        "done: %.1f s training, %.0f tokens/s, peak %.2f GB (%s)",
        train_seconds,
        metrics.train_tokens_per_s,
        metrics.memory["peak_memory_gb"],
        metrics.memory["memory_kind"],
    )
    return metrics


def _loop(model, params, optimizer, scheduler, batches, steps, accumulation, device, training):
    """The optimisation loop; returns the loss curve and token counts."""
    model.train()
    curve: list[dict[str, float]] = []
    train_tokens = loss_tokens = 0
    start = time.perf_counter()
    last_loss = float("nan")
    for step in range(1, steps + 1):
        micro_batches = [next(batches) for _ in range(accumulation)]
        # Token-weighted mean over the whole accumulated step, not a mean of means.
        step_tokens = sum(scored_tokens(b) for b in micro_batches)
        step_loss = 0.0
        for batch in micro_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum, _ = response_loss_sum(model, batch)
            (loss_sum / step_tokens).backward()
            step_loss += loss_sum.item()
            train_tokens += int(batch["attention_mask"].sum())
        loss_tokens += step_tokens
        torch.nn.utils.clip_grad_norm_(params, training["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = step_loss / step_tokens
        if not math.isfinite(last_loss):
            raise FloatingPointError(f"training loss is {last_loss} at step {step}")
        elapsed = time.perf_counter() - start
        curve.append(
            {
                "step": step,
                "loss": last_loss,
                "learning_rate": scheduler.get_last_lr()[0],
                "tokens_seen": train_tokens,
                "elapsed_s": elapsed,
            }
        )
        if step % training["log_every"] == 0 or step == steps:
            log.info(
                "step %d/%d loss %.4f lr %.2e %.0f tokens/s",
                step,
                steps,
                last_loss,
                scheduler.get_last_lr()[0],
                train_tokens / elapsed,
            )
    return curve, train_tokens, loss_tokens, time.perf_counter() - start, last_loss


def _write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOSS_CURVE_FIELDS)
        writer.writeheader()
        writer.writerows(curve)
