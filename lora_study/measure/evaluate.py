"""Evaluate a run (or the base model): perplexity on held-out responses and
exact-match accuracy of greedy answers."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_study.core import phases
from lora_study.core.gpu_slots import claim_job_gpu, job_environment
from lora_study.core.io import atomic_path, write_json
from lora_study.core.metrics import IN_TRAINING, STATUS_OK, EvalMetrics, PeakMemory, perplexity
from lora_study.core.paths import EvalOutputs
from lora_study.prepare.data import load_split
from lora_study.study.modules import resolve_attention
from lora_study.study.sweep import RunSpec
from lora_study.training.batching import collate
from lora_study.training.failures import STATUS_OOM, is_out_of_memory, memory_cap, memory_in_use_gb
from lora_study.training.inference import SharedPrefixCheck, common_prefix_length, dequantized_once, prefix_cache
from lora_study.training.loading import (
    compute_4bit_as_in_training,
    load_for_evaluation,
    load_tokenizer,
    pick_device,
    set_threads,
)
from lora_study.training.loss import ResponseLoss, causal_lm
from lora_study.training.precision import Recipe, detect_capability, quiet_int8_casts, recipe_for

log = logging.getLogger("lora_study")


def normalize_answer(text: str) -> str:
    """First line, inner whitespace collapsed, trailing period dropped."""
    first_line = text.strip().split("\n", 1)[0]
    return " ".join(first_line.split()).rstrip(".")


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def response_nll(
    loss: ResponseLoss, rows, batch_size: int, pad_id: int, device, recipe: Recipe
) -> tuple[list[float], list[int]]:
    """Each row's summed NLL (float64) and scored-token count over its response, computed as in training."""
    nll, tokens = [0.0] * len(rows), [0] * len(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    for indices in batches_by_length(lengths, batch_size):
        batch = collate([rows[i] for i in indices], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with recipe.autocast_context(device.type):
            row_nll, row_tokens = loss.per_row(batch)
        for index, value, count in zip(indices, row_nll.tolist(), row_tokens.tolist(), strict=True):
            nll[index], tokens[index] = value, int(count)
    return nll, tokens


@torch.inference_mode()
def greedy_answers(
    model,
    rows,
    batch_size: int,
    max_new_tokens: int,
    tokenizer,
    pad_id: int,
    device,
    recipe: Recipe,
    share_prefix: bool = True,
    dequantize_once: bool = True,
) -> list[str]:
    """Greedy completions of each row's prompt, batched by length. A prompt prefix all prompts of a batch share
    runs once for the batch, and on CPU 4-bit weights are dequantized once for all decoding steps
    (lora_study.training.inference); either can be turned off (a benchmark's or a test's full computation)."""
    prompts = [r["input_ids"][: r["prompt_length"]] for r in rows]
    answers: list[str] = [""] * len(rows)
    check = SharedPrefixCheck("greedy generation", model)
    if not share_prefix:
        check.usable = False
    with dequantized_once(model) if dequantize_once else contextlib.nullcontext():
        for indices in batches_by_length([len(p) for p in prompts], batch_size):
            batch = [prompts[i] for i in indices]
            with recipe.autocast_context(device.type):
                generated, width = _generate_batch(model, batch, max_new_tokens, tokenizer, pad_id, device, check)
            for index, tokens in zip(indices, generated[:, width:], strict=True):
                answers[index] = tokenizer.decode(tokens, skip_special_tokens=True)
    return answers


def _generate_batch(model, prompts: list[list[int]], max_new_tokens: int, tokenizer, pad_id: int, device,
                    check: SharedPrefixCheck) -> tuple[torch.Tensor, int]:  # fmt: skip
    """The batch's generated sequences and the width of its padded prompts (new tokens start there)."""
    prefix = 0 if check.usable is False else common_prefix_length(prompts, min(map(len, prompts)) - 1)
    if prefix and check.usable is None:
        _check_shared_generation(model, prompts, prefix, tokenizer, pad_id, device, check)
    shared = None
    if prefix and check.usable:
        shared = _generate_shared(model, prompts, prefix, max_new_tokens, tokenizer, pad_id, device)
    return shared or _generate_left_padded(model, prompts, max_new_tokens, tokenizer, pad_id, device)


def _generate_left_padded(model, prompts: list[list[int]], max_new_tokens: int, tokenizer, pad_id: int, device,
                          **extra) -> tuple[Any, int]:  # fmt: skip
    """Every prompt in full, left-padded: (generate's output, padded width)."""
    batch = collate([{"input_ids": p, "prompt_length": 0} for p in prompts], pad_id, padding_side="left")
    output = _generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens, tokenizer, pad_id,
                       device, **extra)  # fmt: skip
    return output, batch["input_ids"].shape[1]


def _generate_shared(model, prompts: list[list[int]], prefix: int, max_new_tokens: int, tokenizer, pad_id: int,
                     device, **extra) -> tuple[Any, int] | None:  # fmt: skip
    """The prefix run once, each prompt's rest after it: (generate's output, padded width); None where the
    model's cache cannot be shared."""
    ids, mask = _prefix_then_left_padded(prompts, prefix, pad_id)
    cache = prefix_cache(causal_lm(model).base_model, ids[:1, :prefix].to(device), len(prompts))
    if cache is None:
        return None
    return _generate(model, ids, mask, max_new_tokens, tokenizer, pad_id, device, cache=cache, **extra), ids.shape[1]


def _prefix_then_left_padded(prompts: list[list[int]], prefix: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared prefix, then each prompt's rest left-padded: the padding sits between them, masked, so every
    row's tokens keep the positions they have unpadded (generation counts positions from the mask)."""
    width = prefix + max(len(p) - prefix for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, :prefix], mask[row, :prefix] = torch.tensor(prompt[:prefix]), 1
        start = width - (len(prompt) - prefix)
        ids[row, start:], mask[row, start:] = torch.tensor(prompt[prefix:]), 1
    return ids, mask


def _check_shared_generation(model, prompts: list[list[int]], prefix: int, tokenizer, pad_id: int, device,
                             check: SharedPrefixCheck) -> None:  # fmt: skip
    """First-step logits of the shortest and the longest prompt, each way (their padding differs most)."""
    started = time.perf_counter()
    pair = [min(prompts, key=len), max(prompts, key=len)]
    first_step = {"output_logits": True, "return_dict_in_generate": True}
    reference, _ = _generate_left_padded(model, pair, 1, tokenizer, pad_id, device, **first_step)
    shared = _generate_shared(model, pair, prefix, 1, tokenizer, pad_id, device, **first_step)
    check.decide(reference.logits[0], None if shared is None else shared[0].logits[0])
    phases.carve("checks", time.perf_counter() - started)


def _generate(model, input_ids, attention_mask, max_new_tokens: int, tokenizer, pad_id: int, device, **extra):
    return model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        # Only the first line is scored (normalize_answer): stop there.
        stop_strings=["\n"],
        tokenizer=tokenizer,
        **extra,
    )


def answer_hits(predictions: list[str], rows) -> list[bool]:
    return [normalize_answer(p) == normalize_answer(r["answer"]) for p, r in zip(predictions, rows, strict=True)]


def exact_match(hits: list[bool], rows) -> tuple[float, dict[str, float]]:
    """Accuracy overall and per family, from each scored prompt's hit."""
    by_family: dict[str, list[bool]] = defaultdict(list)
    for hit, row in zip(hits, rows, strict=True):
        by_family[row["family"] or "all"].append(hit)
    family_accuracy = {name: sum(v) / len(v) for name, v in sorted(by_family.items())}
    return sum(hits) / len(hits), family_accuracy


def inference_setup(run: RunSpec, compute_settings: dict[str, Any], threads: int):
    """(GPU slot, device, capability, recipe) of a job that loads one run for inference."""
    gpu_slot = claim_job_gpu()  # held until this process ends
    set_threads(threads)
    device = pick_device()
    capability = detect_capability(device)
    return gpu_slot, device, capability, recipe_for(run.quantization, compute_settings.get("compute_dtype"), capability)


def load_run_model(
    run: RunSpec,
    recipe: Recipe,
    manifest: dict[str, Any],
    compute_settings: dict[str, Any],
    adapter_dir: Path | None,
    device: torch.device,
):
    """The run as it was evaluated: base in its format with the adapter, or the fully fine-tuned weights."""
    attention = resolve_attention(manifest, compute_settings["attn_implementation"])
    adapter = str(adapter_dir) if adapter_dir else None
    return load_for_evaluation(manifest, recipe, run.double_quant, attention, device,
                               None if run.is_full else adapter, adapter if run.is_full else None)  # fmt: skip


@dataclass(frozen=True)
class EvalData:
    """The validation rows, the ones scored by exact match, and the tokenizer."""

    rows: list[dict[str, Any]]
    scored_indices: list[int]
    tokenizer: Any
    pad_id: int
    general: list[dict[str, Any]] | None = None  # general text (evaluation.forgetting), when on

    @classmethod
    def load(cls, splits_dir: Path, manifest: dict[str, Any], evaluation: dict[str, Any]) -> EvalData:
        from lora_study.prepare.general import general_split

        rows = list(load_split(splits_dir, "validation"))
        tokenizer, pad_id = load_tokenizer(manifest)
        general = general_split(evaluation["forgetting"], tokenizer) if evaluation.get("forgetting") else None
        return cls(rows, exact_answer_indices(rows, evaluation["exact_match_examples"]), tokenizer, pad_id, general)

    @property
    def scored(self) -> list[dict[str, Any]]:
        return [self.rows[i] for i in self.scored_indices]


def score(model, loss: ResponseLoss, data: EvalData, evaluation: dict[str, Any], device, recipe: Recipe
          ) -> dict[str, Any]:  # fmt: skip
    """Per-row response NLL and the greedy answers of the scored prompts: the evaluation's compute."""
    batch_size = evaluation["batch_size"]
    nll_start = time.perf_counter()
    row_nll, row_tokens = response_nll(loss, data.rows, batch_size, data.pad_id, device, recipe)
    nll_seconds = time.perf_counter() - nll_start
    log.info("perplexity %.4f over %d response tokens", perplexity(math.fsum(row_nll), sum(row_tokens)),
             sum(row_tokens))  # fmt: skip
    general = None
    if data.general is not None:  # what the run forgets: its NLL on text it was not trained on
        general = response_nll(loss, data.general, batch_size, data.pad_id, device, recipe)
        log.info("general-text perplexity %.4f over %d tokens", perplexity(math.fsum(general[0]), sum(general[1])),
                 sum(general[1]))  # fmt: skip
    predictions = greedy_answers(model, data.scored, evaluation["generation_batch_size"],
                                 evaluation["max_new_tokens"], data.tokenizer, data.pad_id, device, recipe)  # fmt: skip
    phases.end("compute")
    return {"row_nll": row_nll, "row_tokens": row_tokens, "nll_seconds": nll_seconds, "predictions": predictions,
            "general": general}  # fmt: skip


def write_scores(scores: dict[str, Any], data: EvalData, outputs: EvalOutputs, **fields: Any) -> dict[str, Any]:
    """Predictions, per-row examples and the metrics fields they give (returned, for the metrics file)."""
    total_nll, tokens = math.fsum(scores["row_nll"]), sum(scores["row_tokens"])
    eval_tokens = sum(len(r["input_ids"]) for r in data.rows)
    hits = answer_hits(scores["predictions"], data.scored)
    accuracy, by_family = exact_match(hits, data.scored) if data.scored else (None, {})
    if data.scored:
        log.info("exact-match accuracy %.3f on %d prompts", accuracy, len(data.scored))
    _write_predictions(outputs.predictions, data.scored, scores["predictions"])
    write_examples(outputs.examples, scores["row_nll"], scores["row_tokens"],
                   dict(zip(data.scored_indices, hits, strict=True)))  # fmt: skip
    if outputs.general is not None and scores.get("general") is not None:
        general_nll, general_tokens = scores["general"]
        write_examples(outputs.general, general_nll, general_tokens, {})
        fields["general_perplexity"] = perplexity(math.fsum(general_nll), sum(general_tokens))
        fields["general_tokens"] = sum(general_tokens)
    return dict(
        eval_loss=total_nll / tokens,
        perplexity=perplexity(total_nll, tokens),
        eval_tokens=eval_tokens,
        eval_tokens_per_s=eval_tokens / scores["nll_seconds"],
        accuracy=accuracy,
        accuracy_n=len(data.scored),
        accuracy_by_family=by_family,
        **fields,
    )


def eval_metrics(run_id: str, status: str, device, recipe: Recipe, capability, gpu_slot, started: float,
                 **fields: Any) -> EvalMetrics:  # fmt: skip
    """An evaluation's record: where and how it computed, and its wall time since `started`."""
    return EvalMetrics(run_id=run_id, device=device.type, status=status, compute_dtype=recipe.compute_dtype,
                       weight_format=recipe.weight_format, capability=capability.to_dict(),
                       eval_wall_s=time.perf_counter() - started, environment=job_environment(gpu_slot),
                       **fields)  # fmt: skip


def evaluate_run(
    run: RunSpec,
    evaluation: dict[str, Any],
    compute_settings: dict[str, Any],
    manifest: dict[str, Any],
    splits_dir: Path,
    adapter_dir: Path | None,
    outputs: EvalOutputs,
    threads: int,
    train_status: str = STATUS_OK,
    loss_path: str | None = None,
) -> EvalMetrics:
    """Score a run under its precision recipe; a run that did not train (oom, skipped) passes its status through.

    `loss_path`: how training computed the loss (loss.ResponseLoss), checked there once for the run; None (the
    base model) checks it here.
    """
    start = time.perf_counter()
    gpu_slot, device, capability, recipe = inference_setup(run, compute_settings, threads)
    import peft  # noqa: F401  (transformers and bitsandbytes too; before any memory cap, like everything heavy)

    phases.end("imports")
    memory = PeakMemory(device)

    def record(status: str, **fields: Any) -> EvalMetrics:
        return eval_metrics(run.run_id, status, device, recipe, capability, gpu_slot, start, **fields)

    def not_evaluated(status: str, failure: dict[str, Any]) -> EvalMetrics:
        _write_predictions(outputs.predictions, [], [])
        write_examples(outputs.examples, [], [], {})
        if outputs.general is not None:
            write_examples(outputs.general, [], [], {})
        metrics = record(status, failure=failure)
        write_json(outputs.metrics, metrics.to_dict())
        return metrics

    if train_status != STATUS_OK:
        log.info("%s was not trained (status %s): nothing to evaluate", run.run_id, train_status)
        return not_evaluated(train_status, {"phase": "train"})
    log.info("evaluating %s on %s; recipe: %s", run.run_id, capability.summary(), recipe.describe())
    data = EvalData.load(splits_dir, manifest, evaluation)
    limit_gb = compute_settings.get("memory_limit_gb")
    try:
        with memory, memory_cap(limit_gb, device, memory), quiet_int8_casts():
            model = load_run_model(run, recipe, manifest, compute_settings, adapter_dir, device)
            loss = ResponseLoss(model, loss_path)
            phases.end("load")
            scores = score(model, loss, data, evaluation, device, recipe)
    except Exception as error:
        if not is_out_of_memory(error, memory_capped=limit_gb is not None):
            raise
        log.error("out of memory during evaluation: recorded as status 'oom'")
        failure = {"phase": "evaluate", "error": f"{type(error).__name__}: {error}"[:500], "memory_limit_gb": limit_gb}
        return not_evaluated(STATUS_OOM, {**failure, **memory_in_use_gb(device)})
    metrics = record(STATUS_OK, **write_scores(scores, data, outputs, loss_path=loss.path, memory=memory.report()))
    write_json(outputs.metrics, metrics.to_dict())
    return metrics


def exact_answer_indices(rows: list[dict[str, Any]], limit: int) -> list[int]:
    """Positions of the first `limit` validation rows with exact answers (a non-empty family); warns when none."""
    scored = [i for i, r in enumerate(rows) if r["family"]][:limit]
    if limit and not scored:
        log.warning(
            "evaluation.exact_match_examples is %d but no validation row has an exact answer: accuracy is not "
            "measured (give the data a 'family' column, or set dataset.exact_answers: true)",
            limit,
        )
    return scored


def _write_predictions(path: Path, rows, predictions: list[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w") as handle:
        for row, prediction in zip(rows, predictions, strict=True):
            record = {"family": row["family"], "answer": row["answer"], "prediction": prediction}
            handle.write(json.dumps(record) + "\n")


EXAMPLE_FIELDS = ("row", "nll", "tokens", "correct")


def write_examples(path: Path, nll: list[float], tokens: list[int], hits: dict[int, bool]) -> None:
    """One line per validation row (or general-text row): summed NLL, scored tokens, exact-match hit (empty when
    not scored).

    Every run is scored on the same rows in the same order, so two runs compare row by row.
    """
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(EXAMPLE_FIELDS)
        for row, (value, count) in enumerate(zip(nll, tokens, strict=True)):
            hit = hits.get(row)
            writer.writerow([row, repr(value), count, "" if hit is None else int(hit)])


# --- the training job's evaluation of its own model (lora_study.measure.handoff) -----------------------------------


@dataclass(frozen=True)
class InTrainingEvaluation:
    """The evaluate job's scoring, run by the training job on the model it holds and left as a hand-off."""

    evaluation: dict[str, Any]
    compute: dict[str, Any]
    device_setting: str | None
    manifest: dict[str, Any]
    splits_dir: Path
    handoff_dir: Path
    threads: int  # the job's threads, as the evaluate job's key counts its own

    def __call__(self, model, job, trained: ResponseLoss, adapter_dir: Path) -> bool:
        """Score `model` (trained, saved at `adapter_dir`); True if a hand-off was left. Any failure (out of
        memory included) leaves none: the evaluate job then evaluates, and records what happens there. The loss
        takes what `trained` (training's loss on the same model) checked: its path and its prefix sharing."""
        from lora_study.measure import handoff

        loss_path = trained.path

        started = time.perf_counter()
        staging = None
        try:
            staging = Path(tempfile.mkdtemp(prefix="eval-", dir=Path(self.handoff_dir).parent))
            as_loaded_for_evaluation(model, job.recipe)
            data = EvalData.load(self.splits_dir, self.manifest, self.evaluation)
            phases.end("load")
            with quiet_int8_casts():
                loss = ResponseLoss(model, loss_path)
                loss.prefix_check.take(trained.prefix_check)
                scores = score(model, loss, data, self.evaluation, job.device, job.recipe)
            outputs = EvalOutputs(
                staging / "eval_metrics.json", staging / "predictions.jsonl", staging / "examples.csv",
                staging / "general.csv" if data.general is not None else None,
            )  # fmt: skip
            fields = write_scores(scores, data, outputs, loss_path=loss_path, memory={"memory_kind": IN_TRAINING})
            metrics = eval_metrics(job.run.run_id, STATUS_OK, job.device, job.recipe, job.capability, job.gpu_slot,
                                   started, evaluated_in=IN_TRAINING, **fields)  # fmt: skip
            write_json(outputs.metrics, metrics.to_dict())
            key = handoff.handoff_key(job.run.as_params(), self.evaluation, self.compute, self.device_setting,
                                      self.manifest, adapter_dir, self.splits_dir, self.threads)  # fmt: skip
            handoff.leave(self.handoff_dir, key, outputs.by_name())
        except Exception as error:  # the evaluate job evaluates instead, and fails or records it there
            phases.end("compute")
            log.warning("evaluation in the training job failed (%s: %s): the evaluate job evaluates the run",
                        type(error).__name__, str(error)[:300])  # fmt: skip
            return False
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        log.info("evaluated in the training job in %.1f s: the evaluate job takes the result", metrics.eval_wall_s)
        return True


def as_loaded_for_evaluation(model, recipe: Recipe) -> None:
    """Put a trained model in the state load_for_evaluation gives: eval mode, KV cache on, no gradient
    checkpointing or input-gradient hook, 4-bit layers on training's arithmetic, and for quantized runs every
    unquantized base tensor back in the load dtype (prepare_model_for_kbit_training upcast them to fp32 for
    training; frozen, so the cast back is exact), then the recipe's casts."""
    from lora_study.training.precision import apply_recipe

    model.zero_grad(set_to_none=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_activation_checkpointing", False):
        base.activation_checkpointing_disable()
    if getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()
    base.config.use_cache = True
    if recipe.quantized:
        for name, param in model.named_parameters():
            if "lora_" not in name and param.dtype.is_floating_point and param.dtype != recipe.load_dtype:
                param.data = param.data.to(recipe.load_dtype)
        apply_recipe(model, recipe)
    compute_4bit_as_in_training(model)
    model.eval()
