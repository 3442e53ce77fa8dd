"""Evaluation with and without its shortcuts, side by side in one process: a prompt prefix the batch shares run
once and 4-bit weights dequantized once on CPU for generation (lora_study.training.inference) against every row in
full and dequantization at every call (the evaluation before them); both generate in batches of the study's
evaluation.generation_batch_size unless --generation-batch sets the shortcuts' side.

    snakemake --cores 2 results/runs/r16-qkvo-nf4/train_metrics.json   # or any finished study
    python bench/eval_speed.py --study . --run r16-qkvo-nf4 [--rounds 3] [--generation-batch 64]

Alternates before, after, before, after ... after one untimed warm-up of each. Prints the CPU, per side the
seconds of perplexity (validation responses), general text and greedy generation (median [min, max]), then
whether the answers are identical and how far the perplexities moved.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIDES = {"before": {"share": False, "generation_batch": None}, "after": {"share": True, "generation_batch": None}}


def evaluate_once(model, data, evaluation: dict, recipe, side: str) -> dict:
    from lora_study.measure.evaluate import greedy_answers, response_nll
    from lora_study.training.loss import SHORTCUT, ResponseLoss

    settings, cpu = SIDES[side], torch.device("cpu")
    loss = ResponseLoss(model, SHORTCUT)
    if not settings["share"]:
        loss.prefix_check.usable = False
    timings, started = {}, time.perf_counter()
    nll, tokens = response_nll(loss, data.rows, evaluation["batch_size"], data.pad_id, cpu, recipe)
    timings["perplexity"], started = time.perf_counter() - started, time.perf_counter()
    general = response_nll(loss, data.general, evaluation["batch_size"], data.pad_id, cpu, recipe)
    timings["general text"], started = time.perf_counter() - started, time.perf_counter()
    generation_batch = settings["generation_batch"] or evaluation["generation_batch_size"]
    answers = greedy_answers(model, data.scored, generation_batch, evaluation["max_new_tokens"],
                             data.tokenizer, data.pad_id, cpu, recipe, share_prefix=settings["share"],
                             dequantize_once=settings["share"])  # fmt: skip
    timings["generation"] = time.perf_counter() - started
    return {"timings": timings, "answers": answers, "perplexity": math.exp(math.fsum(nll) / sum(tokens)),
            "general": math.exp(math.fsum(general[0]) / sum(general[1]))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("."))
    parser.add_argument("--run", default="r16-qkvo-nf4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generation-batch", type=int, help="the shortcuts' side only (default: the study's)")
    args = parser.parse_args()
    SIDES["after"]["generation_batch"] = args.generation_batch

    import yaml

    from lora_study.core.io import read_json
    from lora_study.measure.evaluate import EvalData
    from lora_study.study.config import validate_config
    from lora_study.study.sweep import expand_study
    from lora_study.training.loading import load_for_evaluation
    from lora_study.training.precision import detect_capability, recipe_for

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    capability = detect_capability(cpu)
    config = validate_config(yaml.safe_load((args.study / "config" / "config.yaml").read_text()))
    run = expand_study(config)[args.run]
    recipe = recipe_for(run.quantization, config["training"].get("compute_dtype"), capability)
    print(
        f"CPU: {capability.summary()}; get_cpu_capability() {torch.backends.cpu.get_cpu_capability()}; "
        f"_is_avx512_bf16_supported() {torch.cpu._is_avx512_bf16_supported()}; {recipe.describe()}",
        flush=True,
    )
    manifest = read_json(args.study / "results/model/model.json")
    data = EvalData.load(args.study / "results/data/splits", manifest, config["evaluation"])
    if data.general is None:
        raise SystemExit("the study's evaluation.forgetting is off: this benchmark times the general text too")
    model = load_for_evaluation(manifest, recipe, run.double_quant, "sdpa", cpu,
                                str(args.study / f"results/runs/{args.run}/adapter"))  # fmt: skip
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for side in SIDES:  # warm-up: first calls create kernels and caches
        evaluate_once(model, data, config["evaluation"], recipe, side)
    for round_index in range(args.rounds):
        for side in SIDES if round_index % 2 == 0 else reversed(SIDES):
            outcome = evaluate_once(model, data, config["evaluation"], recipe, side)
            results[side].append(outcome)
            print(f"round {round_index + 1} {side:6s} " + ", ".join(f"{k} {v:.1f} s" for k, v in
                  outcome["timings"].items()), flush=True)  # fmt: skip

    print(f"\n{args.run}: {len(data.rows)} validation rows, {len(data.general)} general-text rows, "
          f"{len(data.scored)} prompts; seconds, median [min, max] of {args.rounds} rounds")  # fmt: skip
    parts = [*results["before"][0]["timings"], "total"]
    print(f"{'':8s}" + "".join(f"{part:>24s}" for part in parts))
    for side, outcomes in results.items():
        cells = []
        for part in parts:
            values = [sum(o["timings"].values()) if part == "total" else o["timings"][part] for o in outcomes]
            cells.append(f"{statistics.median(values):.1f} [{min(values):.1f}, {max(values):.1f}]")
        print(f"{side:8s}" + "".join(f"{cell:>24s}" for cell in cells))
    before, after = results["before"][0], results["after"][0]
    total = {
        side: statistics.median(sum(o["timings"].values()) for o in outcomes) for side, outcomes in results.items()
    }
    differ = sum(a != b for a, b in zip(before["answers"], after["answers"], strict=True))
    print(f"after/before total x{total['after'] / total['before']:.2f}; answers differing {differ} of "
          f"{len(before['answers'])}; perplexity {before['perplexity']:.6f} vs {after['perplexity']:.6f} "
          f"({100 * abs(after['perplexity'] / before['perplexity'] - 1):.1e} %), general text "
          f"{before['general']:.6f} vs {after['general']:.6f}")  # fmt: skip


if __name__ == "__main__":
    main()
