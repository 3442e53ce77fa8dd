"""This project's training loop vs a plain transformers.Trainer + PEFT script,
side by side in one run.

    python bench/trainer_vs_loop.py [--rounds 3] [--steps 24] [--run r16-qkvo-nf4] [--sides ours ours-full trainer]

Both train the same LoRA configuration of the default config (model, data,
quantization, learning rate, batch size, steps, seed) from the same prepared
split, each in its own process (so peak memory is each one's own), alternating
A, B, A, B. The Trainer side is what a user would write otherwise: the usual
padding collator (DataCollatorForSeq2Seq), full-vocabulary logits, no length
grouping. The side `ours-full` is this loop computing every row in full (no
prompt prefix shared by a batch's rows). Printed per side: useful tokens/s (tokens that carry a loss, per
second of training), peak memory, validation perplexity of the trained
adapter; then the ratios. Needs results/model and results/data from a study run
(`snakemake --cores 2 results/data/summary.json`).

Peak memory is each side's whole process, of one kind for both: peak RSS on a
CPU, torch's peak allocated CUDA memory on a GPU (the loop's own figure is its
job's, load included, as the Trainer side's).

On a machine without the model (a GPU machine with no network): make a kit
here, carry it there, and train from random weights of the same architecture
(speed and memory do not depend on the weights' values; perplexity then only
compares the sides):

    python bench/trainer_vs_loop.py --make-kit bench/kit      # config, manifest, tokenizer, data; no weights
    python bench/trainer_vs_loop.py --kit bench/kit --steps 16   # there: random weights saved once, then as above
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


# Files of a model's weights, left out of a kit (the rest of the model folder is a few MB).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx")
# What a model folder loads from: one file, or an index naming its shards (moved in last when weights are drawn).
WHOLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def setup_paths(kit: Path | None) -> tuple[Path, Path, Path]:
    """(config, manifest, splits) of the study in the repo, or of a kit."""
    if kit is None:
        return (
            REPO / "config" / "config.yaml",
            REPO / "results" / "model" / "model.json",
            REPO / "results" / "data" / "splits",
        )
    return kit / "config.yaml", kit / "model.json", kit / "splits"


def load_setup(run_id: str, steps: int, kit: Path | None = None):
    from dataclasses import replace

    import yaml

    from lora_study.core.io import read_json
    from lora_study.study.config import validate_config
    from lora_study.study.sweep import expand_study

    config_path, manifest_path, splits = setup_paths(kit)
    config = validate_config(yaml.safe_load(config_path.read_text()))
    spec = expand_study(config)[run_id]
    run = replace(spec, training=spec.training.replace(max_steps=steps))
    manifest = read_json(manifest_path)
    if kit is not None:  # the kit's model folder, wherever the kit is
        manifest["path"] = str(kit / "model")
    return config, run, manifest, splits


def make_kit(out: Path, config_path: Path, manifest_path: Path, splits: Path) -> None:
    """A study's config, model manifest, model folder without its weights, and data splits, in `out`."""
    import shutil

    from lora_study.core.io import read_json, write_json

    manifest = read_json(manifest_path)
    if out.exists():
        raise SystemExit(f"{out} exists: choose a new folder for the kit")
    (out / "model").mkdir(parents=True)
    for item in Path(manifest["path"]).iterdir():
        if item.is_dir():
            print(f"kit: {item.name}/ left out (a model folder's subfolder)")
        elif not item.name.endswith(WEIGHT_SUFFIXES) and not item.name.endswith(".index.json"):
            shutil.copy2(item, out / "model" / item.name)
    shutil.copytree(splits, out / "splits")
    shutil.copy2(config_path, out / "config.yaml")
    write_json(out / "model.json", {**manifest, "path": "model"})
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"kit in {out}: {size / 1e6:.1f} MB (no weights)")


def ensure_weights(kit: Path) -> bool:
    """Random weights (seed 0) of the kit's architecture in its config's dtype, saved once; True when the kit's
    weights are random. Drawn into a scratch folder and moved in (an index last), so an interrupted draw leaves
    nothing that looks like weights."""
    import os
    import tempfile

    from lora_study.core.io import read_json

    folder = kit / "model"
    marker = folder / "random_weights.txt"
    if any(item.name in WHOLE_WEIGHTS or item.name.endswith(".index.json") for item in folder.iterdir()):
        return marker.exists()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = bool(read_json(kit / "model.json").get("trust_remote_code"))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, str(dtype).removeprefix("torch.")) if not isinstance(dtype, torch.dtype) else dtype
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust)
    with tempfile.TemporaryDirectory(dir=kit) as scratch:
        model.save_pretrained(scratch)
        drawn = sorted(Path(scratch).iterdir(), key=lambda item: item.name.endswith(".index.json"))
        for item in drawn:
            if item.name.endswith(WEIGHT_SUFFIXES) or item.name.endswith(".index.json"):
                os.replace(item, folder / item.name)
    marker.write_text(f"weights drawn at random (seed 0, {dtype}) by bench/trainer_vs_loop.py\n")
    return True


def peak_memory(device, job_memory: dict | None = None) -> tuple[float, str]:
    """This process's peak memory in GB and its kind: torch's peak allocated on CUDA, peak RSS on a CPU. For the
    loop, its job's own figure (`job_memory`, train_metrics' memory: load included, like the Trainer side's)."""
    import torch

    from lora_study.core.metrics import peak_rss_bytes

    if device.type == "cuda":
        if job_memory is not None:
            return job_memory["cuda_max_allocated_gb"], "peak CUDA allocated GB"
        return torch.cuda.max_memory_allocated(device) / 1024**3, "peak CUDA allocated GB"
    if job_memory is not None:
        return job_memory["peak_memory_gb"], "peak RSS GB"
    return peak_rss_bytes() / 1024**3, "peak RSS GB"


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


def worker_ours_full(run_id: str, steps: int, out: Path, threads: int, kit: Path | None) -> dict:
    from lora_study.training.loss import ResponseLoss

    ResponseLoss.shares_prefix_in_training = False
    return worker_ours(run_id, steps, out, threads, kit)


def worker_ours(run_id: str, steps: int, out: Path, threads: int, kit: Path | None) -> dict:
    from lora_study.core.metrics import STATUS_OK
    from lora_study.study.modules import resolve_attention
    from lora_study.training.loading import load_for_evaluation, pick_device
    from lora_study.training.loop import TrainOutputs, train_run

    config, run, manifest, splits = load_setup(run_id, steps, kit)
    metrics = train_run(
        run, manifest, splits, TrainOutputs(out / "adapter", out / "m.json", out / "c.csv"), threads,
        checkpoint_dir=out / "ckpt",
    )  # fmt: skip
    if metrics.status != STATUS_OK:
        raise SystemExit(f"the loop's run ended with status {metrics.status}: {metrics.failure}")
    device = pick_device()
    peak, kind = peak_memory(device, metrics.memory)
    recipe = local_recipe(run)
    attention = resolve_attention(manifest, run.training.attn_implementation)
    model = load_for_evaluation(manifest, recipe, run.double_quant, attention, device, str(out / "adapter"))
    return {
        "loss_tokens": metrics.loss_tokens,
        "train_s": metrics.train_wall_s,
        "peak_gb": peak,
        "memory_kind": kind,
        "device": device_name(device),
        "perplexity": perplexity_of(model, recipe, manifest, splits, config["evaluation"]["batch_size"]),
    }


def local_recipe(run):
    from lora_study.training.loading import pick_device
    from lora_study.training.precision import detect_capability, recipe_for

    return recipe_for(run.quantization, run.training.compute_dtype, detect_capability(pick_device()))


def worker_trainer(run_id: str, steps: int, out: Path, threads: int, kit: Path | None) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lora_study.prepare.data import load_split
    from lora_study.study.modules import manifest_layout, resolve_attention, resolve_targets
    from lora_study.training.batching import IGNORE_INDEX
    from lora_study.training.loading import add_lora, load_base_model, load_tokenizer, pick_device, set_threads

    config, run, manifest, splits = load_setup(run_id, steps, kit)
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
    if device.type == "cuda":  # its last step's kernels inside the time, as the loop's own clock has them
        import torch

        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - start
    peak, kind = peak_memory(device)
    return {
        "loss_tokens": loss_tokens,
        "train_s": train_s,
        "peak_gb": peak,
        "memory_kind": kind,
        "device": device_name(device),
        "perplexity": perplexity_of(model, recipe, manifest, splits, config["evaluation"]["batch_size"]),
    }


def cpu_line() -> str:
    import torch

    from lora_study.training.precision import detect_capability

    return (f"CPU: {detect_capability(torch.device('cpu')).summary()}; get_cpu_capability() "
            f"{torch.backends.cpu.get_cpu_capability()}; _is_avx512_bf16_supported() "
            f"{torch.cpu._is_avx512_bf16_supported()}")  # fmt: skip


def device_name(device) -> str:
    """The device a side trained on: the GPU's name and compute capability, or the CPU (read in the workers: the
    parent process never initialises CUDA)."""
    if device.type != "cuda":
        return device.type
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}), torch {torch.__version__}"


def run_side(side: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--worker", side, "--out", tmp, "--run", args.run]
        command += ["--steps", str(args.steps), "--threads", str(args.threads)]
        command += ["--kit", str(args.kit)] if args.kit else []
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
    parser.add_argument("--kit", type=Path, help="train from this kit (--make-kit) instead of the repo's results")
    parser.add_argument("--make-kit", type=Path, metavar="DIR", help="write a kit of the repo's study to DIR, exit")
    parser.add_argument("--worker", choices=list(WORKERS))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.run, args.steps, Path(args.out), args.threads, args.kit)))
        return
    if args.make_kit:
        make_kit(args.make_kit, *setup_paths(None))
        return

    print(cpu_line(), flush=True)
    if args.kit and ensure_weights(args.kit):
        print("weights: random (seed 0), the model's architecture: perplexity only compares the sides", flush=True)
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

    kinds = {r["memory_kind"] for side in args.sides for r in results[side]}
    devices = {r["device"] for side in args.sides for r in results[side]}
    if len(kinds) != 1 or len(devices) != 1:
        raise SystemExit(f"the sides ran on different devices or measured different memory: {devices}, {kinds}")
    print(f"\n{args.run}, {args.steps} steps, {args.rounds} rounds on {devices.pop()}: median [min, max]")
    print(f"{'':10s}{'useful tok/s':>24s}{kinds.pop():>24s}{'perplexity':>32s}")
    for side in args.sides:
        print(f"{side:10s}{spread(side, 'useful_tokens_per_s', 1):>24s}{spread(side, 'peak_gb', 2):>24s}"
              f"{spread(side, 'perplexity', 6):>32s}")  # fmt: skip
    reference = args.sides[-1]
    for side in args.sides[:-1]:
        speed = median(side, "useful_tokens_per_s") / median(reference, "useful_tokens_per_s")
        memory = median(side, "peak_gb") / median(reference, "peak_gb")
        quality = median(side, "perplexity") / median(reference, "perplexity")
        print(f"ratio {side}/{reference}: useful tokens/s x{speed:.2f}, peak memory x{memory:.2f}, "
              f"perplexity x{quality:.6f}")  # fmt: skip


WORKERS = {"ours": worker_ours, "ours-full": worker_ours_full, "trainer": worker_trainer}

if __name__ == "__main__":
    main()
