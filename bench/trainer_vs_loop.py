"""This project's training loop vs a plain transformers.Trainer + PEFT script,
side by side in one run.

    python bench/trainer_vs_loop.py [--rounds 3] [--steps 24] [--run r16-qkvo-nf4] [--sides ours ours-full trainer]

Both train the same LoRA configuration of the default config (model, data,
quantization, learning rate, batch size, steps, seed) from the same prepared
split, each in its own process (so peak RSS is each one's own), alternating
A, B, A, B. The Trainer side is what a user would write otherwise: the usual
padding collator (DataCollatorForSeq2Seq), full-vocabulary logits, no length
grouping. The side `ours-full` is this loop computing every row in full (no
prompt prefix shared by a batch's rows). Printed per side: useful tokens/s (tokens that carry a loss, per
second of training), peak memory, validation perplexity of the trained
adapter; then the ratios. Needs results/model and results/data from a study run
(`snakemake --cores 2 results/data/summary.json`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def load_setup(run_id: str, steps: int):
    from dataclasses import replace

    import yaml

    from lora_study.core.io import read_json
    from lora_study.study.config import validate_config
    from lora_study.study.sweep import expand_study

    config = validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    spec = expand_study(config)[run_id]
    run = replace(spec, training=spec.training.replace(max_steps=steps))
    manifest = read_json(REPO / "results" / "model" / "model.json")
    return config, run, manifest, REPO / "results" / "data" / "splits"


def perplexity_of(model, recipe, manifest, splits: Path, batch_size: int) -> float:
    from lora_study.core.metrics import perplexity
    from lora_study.measure.evaluate import response_nll
    from lora_study.prepare.data import load_split
    from lora_study.training.loading import load_tokenizer
    from lora_study.training.loss import ResponseLoss

    _, pad_id = load_tokenizer(manifest)
    model.eval()
    rows = list(load_split(splits, "validation"))
    nll, tokens = response_nll(ResponseLoss(model), rows, batch_size, pad_id, model.device, recipe)
    return perplexity(sum(nll), sum(tokens))


def worker_ours_full(run_id: str, steps: int, out: Path, threads: int) -> dict:
    from lora_study.training.loss import ResponseLoss

    ResponseLoss.shares_prefix_in_training = False
    return worker_ours(run_id, steps, out, threads)


def worker_ours(run_id: str, steps: int, out: Path, threads: int) -> dict:
    from lora_study.core.metrics import peak_rss_bytes
    from lora_study.study.modules import resolve_attention
    from lora_study.training.loading import load_for_evaluation, pick_device
    from lora_study.training.loop import TrainOutputs, train_run

    config, run, manifest, splits = load_setup(run_id, steps)
    metrics = train_run(
        run, manifest, splits, TrainOutputs(out / "adapter", out / "m.json", out / "c.csv"), threads,
        checkpoint_dir=out / "ckpt",
    )  # fmt: skip
    peak = peak_rss_bytes()
    recipe = local_recipe(run)
    attention = resolve_attention(manifest, run.training.attn_implementation)
    model = load_for_evaluation(manifest, recipe, run.double_quant, attention, pick_device(), str(out / "adapter"))
    return {
        "loss_tokens": metrics.loss_tokens,
        "train_s": metrics.train_wall_s,
        "peak_rss_gb": peak / 1024**3,
        "perplexity": perplexity_of(model, recipe, manifest, splits, config["evaluation"]["batch_size"]),
    }


def local_recipe(run):
    from lora_study.training.loading import pick_device
    from lora_study.training.precision import detect_capability, recipe_for

    return recipe_for(run.quantization, run.training.compute_dtype, detect_capability(pick_device()))


def worker_trainer(run_id: str, steps: int, out: Path, threads: int) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lora_study.core.metrics import peak_rss_bytes
    from lora_study.prepare.data import load_split
    from lora_study.study.modules import manifest_layout, resolve_attention, resolve_targets
    from lora_study.training.batching import IGNORE_INDEX
    from lora_study.training.loading import add_lora, load_base_model, load_tokenizer, pick_device, set_threads

    config, run, manifest, splits = load_setup(run_id, steps)
    set_threads(threads)
    t = run.training.to_dict()
    tokenizer, pad_id = load_tokenizer(manifest)
    tokenizer.pad_token_id = pad_id
    device = pick_device()
    recipe = local_recipe(run)
    attention = resolve_attention(manifest, t["attn_implementation"])
    model = load_base_model(manifest, recipe, run.double_quant, attention, device)
    targets = resolve_targets(manifest_layout(manifest), run.modules, manifest["linear_layers"], manifest["model_type"],
                              t["lora_dropout"])  # fmt: skip
    model = add_lora(model, recipe, targets, run.rank, run.alpha, t["lora_dropout"], gradient_checkpointing=False)

    def with_labels(row):
        labels = list(row["input_ids"])
        labels[: row["prompt_length"]] = [IGNORE_INDEX] * row["prompt_length"]
        return {"input_ids": row["input_ids"], "attention_mask": [1] * len(labels), "labels": labels}

    train = load_split(splits, "train").map(with_labels, remove_columns=["prompt_length", "answer", "family"])
    padding = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    loss_tokens = 0

    def counting_collator(rows):
        nonlocal loss_tokens
        batch = padding(rows)
        loss_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return batch

    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=t["batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"], learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler"], warmup_steps=t["warmup_steps"], weight_decay=t["weight_decay"],
        max_grad_norm=t["max_grad_norm"], seed=t["seed"], logging_steps=steps, save_strategy="no",
        report_to=[], dataloader_num_workers=0, use_cpu=device.type == "cpu", remove_unused_columns=False,
        bf16=recipe.compute_dtype == "bf16", fp16=recipe.compute_dtype == "fp16",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=counting_collator)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {
        "loss_tokens": loss_tokens,
        "train_s": train_s,
        "peak_rss_gb": peak / 1024**3,
        "perplexity": perplexity_of(model, recipe, manifest, splits, config["evaluation"]["batch_size"]),
    }


def cpu_line() -> str:
    import torch

    from lora_study.training.precision import detect_capability

    return (f"CPU: {detect_capability(torch.device('cpu')).summary()}; get_cpu_capability() "
            f"{torch.backends.cpu.get_cpu_capability()}; _is_avx512_bf16_supported() "
            f"{torch.cpu._is_avx512_bf16_supported()}")  # fmt: skip


def run_side(side: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--worker", side, "--out", tmp, "--run", args.run]
        command += ["--steps", str(args.steps), "--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{side} failed:\n{result.stderr[-4000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--run", default="r16-qkvo-nf4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sides", nargs="+", choices=list(WORKERS), default=["ours", "trainer"])
    parser.add_argument("--worker", choices=list(WORKERS))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.run, args.steps, Path(args.out), args.threads)))
        return

    print(cpu_line(), flush=True)
    results: dict[str, list[dict]] = {side: [] for side in args.sides}
    for round_index in range(args.rounds):
        for side in args.sides if round_index % 2 == 0 else reversed(args.sides):
            outcome = run_side(side, args)
            outcome["useful_tokens_per_s"] = outcome["loss_tokens"] / outcome["train_s"]
            results[side].append(outcome)
            print(f"round {round_index + 1} {side:8s} {json.dumps(outcome)}", flush=True)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    def spread(side: str, key: str, digits: int) -> str:
        values = [r[key] for r in results[side]]
        return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"

    print(f"\n{args.run}, {args.steps} steps, {args.rounds} rounds: median [min, max]")
    print(f"{'':10s}{'useful tok/s':>24s}{'peak RSS GB':>22s}{'perplexity':>32s}")
    for side in args.sides:
        print(f"{side:10s}{spread(side, 'useful_tokens_per_s', 1):>24s}{spread(side, 'peak_rss_gb', 2):>22s}"
              f"{spread(side, 'perplexity', 6):>32s}")  # fmt: skip
    reference = args.sides[-1]
    for side in args.sides[:-1]:
        speed = median(side, "useful_tokens_per_s") / median(reference, "useful_tokens_per_s")
        memory = median(side, "peak_rss_gb") / median(reference, "peak_rss_gb")
        quality = median(side, "perplexity") / median(reference, "perplexity")
        print(f"ratio {side}/{reference}: useful tokens/s x{speed:.2f}, peak memory x{memory:.2f}, "
              f"perplexity x{quality:.6f}")  # fmt: skip


WORKERS = {"ours": worker_ours, "ours-full": worker_ours_full, "trainer": worker_trainer}

if __name__ == "__main__":
    main()
