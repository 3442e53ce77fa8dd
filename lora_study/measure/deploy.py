"""What an adapter costs and keeps when deployed: the merge check and serving latency.

Merge check: a QLoRA adapter was trained against the *dequantized* 4-bit (or
8-bit) weights; the usual deployment merges it into the original 16-bit
weights, and some re-quantize after merging. Each way is scored on the
validation rows rule evaluate scored the unmerged adapter on (its
examples.csv), and compared row by row with issue 9's verdicts: a change
beyond the tolerance, shown beyond evaluation noise, is flagged.

Serving: greedy generation of a fixed number of tokens from a fixed prompt,
at batch 1 and at a chosen batch size, after warm-up generations that are not
timed. Each generation streams its tokens to a clock: time to first token is
the prefill plus the first decoding step, the per-token latency the time
after it divided by the further tokens, both read from the same generation.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lora_study.measure.forms import (
    BASE,
    FULL,
    MERGE_OUTCOMES,
    MERGED_16BIT,
    MERGED_REQUANTIZED,
    UNMERGED,
)
from lora_study.stats.verdicts import Evidence, compare
from lora_study.training.failures import oom_as_data, release_memory

log = logging.getLogger("lora_study")

GB = 1024**3

MERGED_FORMS = "merged forms"  # the part of a deploy job that merges (and re-quantizes) the adapter


@dataclass(frozen=True)
class ServingSettings:
    """evaluation.serving from the config."""

    prompt_tokens: int
    new_tokens: int
    batch_size: int
    warmup: int
    repeats: int

    @classmethod
    def from_config(cls, block: dict[str, Any]) -> ServingSettings:
        return cls(block["prompt_tokens"], block["new_tokens"], block["batch_size"], block["warmup"], block["repeats"])

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return (1,) if self.batch_size == 1 else (1, self.batch_size)


# --- merge check -------------------------------------------------------------------------------------------


def merge_verdict(
    merged_nll: np.ndarray, reference_nll: np.ndarray, tokens: np.ndarray, tolerance: float
) -> dict[str, Any]:
    """The merged model's perplexity against the unmerged adapter's, on the same rows.

    Flagged when the change is shown (interval excludes zero) and not shown
    negligible (inside the tolerance): the deployed model is not the one evaluated.
    """
    # One trained adapter in two forms: their difference carries no training noise (trained=False).
    comparison = compare(Evidence(merged_nll[None, :], tokens, trained=False),
                         Evidence(reference_nll[None, :], tokens, trained=False), "perplexity", tolerance)  # fmt: skip
    outcome = MERGE_OUTCOMES[comparison.verdict]
    tokens_total = tokens.sum()
    return {
        "perplexity": math.exp(merged_nll.sum() / tokens_total),
        "reference_perplexity": math.exp(reference_nll.sum() / tokens_total),
        "change": comparison.change,
        "low": comparison.low,
        "high": comparison.high,
        "verdict": comparison.verdict.value,
        "outcome": outcome,
        "se": comparison.se_eval,  # log scale: the report re-judges at the number of checks it counts
        "df": comparison.df,
        "describe": comparison.describe(),
    }


def merge_into(base_model: torch.nn.Module, adapter_dir: str) -> torch.nn.Module:
    """The adapter merged into `base_model`'s weights (W + scale * B A), PEFT wrappers removed."""
    from peft import PeftModel

    from lora_study.study.modules import targets_as_given

    with targets_as_given():
        return PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()


def save_merged(model: torch.nn.Module, tokenizer, out_dir: Path) -> None:
    """Safetensors plus config and tokenizer: a model directory any loader can serve."""
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# --- serving latency ---------------------------------------------------------------------------------------


class TokenClock:
    """A generation streamer that notes when each put reaches the host: first the prompt, then every new
    token (generate copies the token to the CPU, which waits for the device, so the moment is real)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def first_token(self) -> float:
        if len(self.stamps) < 2:
            raise RuntimeError("the generation streamed no new token")
        return self.stamps[1]


def timed_calls(
    call: Callable[[TokenClock], Any], warmup: int, repeats: int, synchronize: Callable[[], None]
) -> list[tuple[float, float]]:
    """(seconds to the first new token, seconds after it) of `repeats` generations, each read from its own
    token times, after `warmup` untimed ones (lazy initialisation, kernel selection). Both parts come from
    one call, so the decoding time is never the difference of two separately noisy medians."""
    timings = []
    for index in range(warmup + repeats):
        clock = TokenClock()
        synchronize()
        start = time.perf_counter()
        call(clock)
        synchronize()
        end = time.perf_counter()
        if index >= warmup:
            timings.append((clock.first_token - start, end - clock.first_token))
    return timings


def serving_prompt(rows, prompt_tokens: int) -> list[int]:
    """A fixed prompt of exactly `prompt_tokens` ids: the validation rows' tokens end to end."""
    ids: list[int] = []
    for row in rows:
        ids.extend(row["input_ids"])
        if len(ids) >= prompt_tokens:
            return ids[:prompt_tokens]
    if not ids:
        raise ValueError("no validation tokens to build a serving prompt from")
    return (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]


@contextmanager
def window_peak(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory inside the block: torch's max allocated on CUDA, sampled resident memory on CPU."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / GB
        result["memory_kind"] = "cuda_max_allocated"
        return
    import psutil

    process, stop, peak = psutil.Process(), threading.Event(), [0]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
    result["peak_memory_gb"] = max(peak[0], process.memory_info().rss) / GB
    result["memory_kind"] = "cpu_rss"


def measure_serving(
    model, prompt_ids: list[int], settings: ServingSettings, device: torch.device, autocast, pad_id: int
) -> dict[str, float]:
    """Greedy generation cost at each batch size: time to first token, ms per further token, tokens/s, and
    how far the repeated whole generations spread (max - min over the median, %), the figures' own noise."""
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    record: dict[str, float] = {}
    for batch in settings.batch_sizes:
        generate = _generation(model, torch.tensor([prompt_ids] * batch, device=device), settings.new_tokens,
                               autocast, pad_id)  # fmt: skip
        timings = timed_calls(generate, settings.warmup, settings.repeats, synchronize)
        first = [first_s for first_s, _ in timings]
        whole = [first_s + rest_s for first_s, rest_s in timings]
        per_token = [rest_s / (settings.new_tokens - 1) for _, rest_s in timings]
        whole_s = float(np.median(whole))
        record[f"ttft_ms_b{batch}"] = 1000 * float(np.median(first))
        record[f"ms_per_token_b{batch}"] = 1000 * float(np.median(per_token))
        record[f"tokens_per_s_b{batch}"] = batch * settings.new_tokens / whole_s
        record[f"spread_pct_b{batch}"] = 100 * (max(whole) - min(whole)) / whole_s
    return record


def _generation(model, input_ids: torch.Tensor, new_tokens: int, autocast, pad_id: int) -> Callable[[TokenClock], Any]:
    attention = torch.ones_like(input_ids)

    def call(clock: TokenClock):
        with torch.inference_mode(), autocast():
            # min = max: every call produces exactly new_tokens (EOS cannot end it early).
            return model.generate(
                input_ids=input_ids, attention_mask=attention, do_sample=False, streamer=clock,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
            )  # fmt: skip

    return call


@contextmanager
def scratch_dir(keep: Path | None) -> Iterator[Path]:
    """`keep` when the merged model is to be saved, else a temporary directory removed afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix="merged-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def reference_rows(examples_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The unmerged adapter's per-row NLL and tokens, as rule evaluate wrote them."""
    frame = pd.read_csv(examples_path).sort_values("row")
    return frame["nll"].to_numpy(dtype=float), frame["tokens"].to_numpy(dtype=float)


# --- the job -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploySettings:
    """What rule deploy measures (from evaluation.merge_check, evaluation.serving, evaluation.save_merged)."""

    merge_check: bool
    tolerance: float
    serving: ServingSettings | None
    save_merged: bool
    batch_size: int  # the validation batch size rule evaluate scored with (same batches, same rows)

    @classmethod
    def from_config(cls, evaluation: dict[str, Any]) -> DeploySettings:
        merge, serving = evaluation["merge_check"], evaluation["serving"]
        return cls(merge["enabled"], merge["tolerance"],
                   ServingSettings.from_config(serving) if serving["enabled"] else None,
                   evaluation["save_merged"], evaluation["batch_size"])  # fmt: skip


def run_deploy(
    run,
    settings: DeploySettings,
    compute_settings: dict[str, Any],
    manifest: dict[str, Any],
    splits_dir: Path,
    adapter_dir: Path | None,
    examples_path: Path | None,
    threads: int,
    train_status: str,
    merge_base_dir: str | None = None,
    merged_dir: Path | None = None,
) -> dict[str, Any]:
    """Serving cost of the run as evaluated and, for an adapter, of each merged form, plus the merge check.

    `merge_base_dir`: the base weights to merge into (default: the prepared model; tests pass another
    to check that a wrong merge is flagged).
    """
    from lora_study.core.gpu_slots import job_environment
    from lora_study.core.metrics import STATUS_OK
    from lora_study.measure.evaluate import inference_setup, load_run_model
    from lora_study.prepare.data import load_split
    from lora_study.training.loading import load_tokenizer
    from lora_study.training.precision import quiet_int8_casts

    start = time.perf_counter()
    record: dict[str, Any] = {"run_id": run.run_id, "status": train_status, "serving": {}, "merge": {}}
    if train_status != STATUS_OK:
        log.info("%s was not trained (status %s): nothing to deploy", run.run_id, train_status)
        return {**record, "wall_s": time.perf_counter() - start}
    gpu_slot, device, capability, recipe = inference_setup(run, compute_settings, threads)
    rows = list(load_split(splits_dir, "validation"))
    tokenizer, pad_id = load_tokenizer(manifest)
    context = _DeployContext(run, settings, compute_settings, manifest, device, recipe, capability, rows, pad_id)
    kind = BASE if run.is_baseline else FULL if run.is_full else UNMERGED
    log.info("deploying %s (%s) on %s; recipe: %s", run.run_id, kind, capability.summary(), recipe.describe())
    with quiet_int8_casts():
        # Out of memory in one form is recorded for it (record["oom"]) and the job goes on: the report says
        # what did not fit instead of waiting on a crashed job.
        limit_gb = compute_settings.get("memory_limit_gb")
        with oom_as_data(record, kind, limit_gb, device):
            with window_peak(device) as memory:
                model = load_run_model(run, recipe, manifest, compute_settings, adapter_dir, device)
                timings = context.serve(model, kind)
            record["serving"][kind] = {**timings, **memory} if timings else {}
            del model
        release_memory()
        wanted = settings.merge_check or settings.serving or settings.save_merged
        if kind == UNMERGED and wanted and kind not in record.get("oom", {}):
            reference = reference_rows(examples_path) if settings.merge_check else None
            with oom_as_data(record, MERGED_FORMS, limit_gb, device):
                context.merged_forms(str(adapter_dir), reference, tokenizer, record, merge_base_dir, merged_dir)
    record.update(device=device.type, compute_dtype=recipe.compute_dtype, weight_format=recipe.weight_format,
                  capability=capability.to_dict(), environment=job_environment(gpu_slot),
                  wall_s=time.perf_counter() - start)  # fmt: skip
    return record


@dataclass
class _DeployContext:
    run: Any
    settings: DeploySettings
    compute_settings: dict[str, Any]
    manifest: dict[str, Any]
    device: torch.device
    recipe: Any
    capability: Any
    rows: list[dict[str, Any]]
    pad_id: int

    def serve(self, model, kind: str, recipe=None) -> dict[str, float]:
        if self.settings.serving is None:
            return {}
        recipe = recipe or self.recipe
        prompt = serving_prompt(self.rows, self.settings.serving.prompt_tokens)
        timings = measure_serving(model, prompt, self.settings.serving, self.device,
                                  lambda: recipe.autocast_context(self.device.type), self.pad_id)  # fmt: skip
        log.info("%s serving: %s", kind, ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
        return timings

    def check(self, model, form: str, recipe, reference: tuple[np.ndarray, np.ndarray], record: dict[str, Any]) -> None:
        from lora_study.measure.evaluate import response_nll
        from lora_study.training.loss import ResponseLoss

        nll, _ = response_nll(ResponseLoss(model), self.rows, self.settings.batch_size, self.pad_id,
                                   self.device, recipe)  # fmt: skip
        verdict = merge_verdict(np.asarray(nll), reference[0], reference[1], self.settings.tolerance)
        log.info("merge check, %s: perplexity %.4f vs unmerged %.4f: %s", form, verdict["perplexity"],
                 verdict["reference_perplexity"], verdict["describe"])  # fmt: skip
        record["merge"][form] = verdict

    def merged_forms(self, adapter: str, reference, tokenizer, record: dict[str, Any], base_dir, merged_dir) -> None:
        """Merged into the original base in the compute dtype; for bitsandbytes runs, then re-quantized."""
        from lora_study.study.modules import resolve_attention
        from lora_study.training.loading import load_for_evaluation
        from lora_study.training.precision import recipe_for

        attention = resolve_attention(self.manifest, self.compute_settings["attn_implementation"])
        # The original weights in the run's resolved compute dtype (bf16/fp16, or fp32 where the device has no
        # fast 16-bit type): what "merge into the 16-bit base" means on this device.
        sixteen = recipe_for(self.recipe.compute_dtype, None, self.capability)
        requantize = self.recipe.quantized
        with window_peak(self.device) as memory:
            base = load_for_evaluation(self.manifest, sixteen, False, attention, self.device, None, base_dir)
            merged = merge_into(base, adapter).eval()
            del base
            if reference is not None:
                self.check(merged, MERGED_16BIT, sixteen, reference, record)
            timings = {} if requantize else self.serve(merged, MERGED_16BIT, sixteen)
        if timings:
            record["serving"][MERGED_16BIT] = {**timings, **memory}
        keep = merged_dir if self.settings.save_merged else None
        if not requantize:
            if keep is not None:
                save_merged(merged, tokenizer, keep)
            del merged
            release_memory()
            return
        with scratch_dir(keep) as weights_dir:
            save_merged(merged, tokenizer, weights_dir)
            del merged
            release_memory()
            with window_peak(self.device) as memory:
                # Loaded from the merged weights in the run's format, as the run itself was.
                requantized = load_for_evaluation(self.manifest, self.recipe, self.run.double_quant, attention,
                                                  self.device, None, str(weights_dir))  # fmt: skip
                if reference is not None:
                    self.check(requantized, MERGED_REQUANTIZED, self.recipe, reference, record)
                timings = self.serve(requantized, MERGED_REQUANTIZED)
            if timings:
                record["serving"][MERGED_REQUANTIZED] = {**timings, **memory}
            del requantized
            release_memory()
