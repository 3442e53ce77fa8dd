"""Evaluating a 4-bit run on CPU: bitsandbytes' inference kernels (what evaluation uses) against the weights
dequantized once into plain linear layers (training's arithmetic: dequantize, then matmul), side by side.

    snakemake --cores 2 results/runs/r16-qkvo-nf4/train_metrics.json
    python bench/eval_4bit_paths.py --run r16-qkvo-nf4
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/eval_4bit_paths.py --run r16-qkvo-nf4

Prints, per path, the perplexity over the validation split and the greedy
answers' time, then the perplexity difference and how many answers differ.
Evaluation keeps the kernels unless the two agree exactly (they did not on
2026-12-06: see the closing note of the study-speed work).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def dequantize_once(model: torch.nn.Module, dtype: torch.dtype) -> int:
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear4bit):  # bitsandbytes' layer, not PEFT's wrapper of the same name
                plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight = torch.nn.Parameter(dequantize_4bit(child.weight.data, child.weight.quant_state)
                                                  .to(dtype), requires_grad=False)  # fmt: skip
                if child.bias is not None:
                    plain.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
                setattr(parent, name, plain)
                replaced += 1
    return replaced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("."))
    parser.add_argument("--run", default="r16-qkvo-nf4")
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args()

    from lora_study.data import load_split
    from lora_study.evaluate import exact_answer_indices, greedy_answers, response_nll
    from lora_study.io import read_json
    from lora_study.loading import load_for_evaluation, load_tokenizer
    from lora_study.loss import SHORTCUT, ResponseLoss
    from lora_study.precision import detect_capability, recipe_for

    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    capability = detect_capability(cpu)
    recipe = recipe_for("nf4", None, capability)
    print(f"CPU: {capability.summary()}; get_cpu_capability() {torch.backends.cpu.get_cpu_capability()}; "
          f"_is_avx512_bf16_supported() {torch.cpu._is_avx512_bf16_supported()}; {recipe.describe()}")  # fmt: skip
    manifest = read_json(args.study / "results/model/model.json")
    rows = list(load_split(args.study / "results/data/splits", "validation"))
    scored = [rows[i] for i in exact_answer_indices(rows, args.prompts)]
    tokenizer, pad_id = load_tokenizer(manifest)
    adapter = str(args.study / f"results/runs/{args.run}/adapter")
    results = {}
    for path in ("kernels", "dequantized once"):
        model = load_for_evaluation(manifest, recipe, True, "sdpa", cpu, adapter)
        if path != "kernels":
            dequantize_once(model, recipe.torch_compute_dtype)
        started = time.perf_counter()
        nll, tokens = response_nll(ResponseLoss(model, SHORTCUT), rows, 16, pad_id, cpu, recipe)
        perplexity_s = time.perf_counter() - started
        started = time.perf_counter()
        answers = greedy_answers(model, scored, 16, 20, tokenizer, pad_id, cpu, recipe)
        results[path] = (math.exp(math.fsum(nll) / sum(tokens)), answers)
        print(f"{path}: perplexity {results[path][0]:.6f} in {perplexity_s:.1f} s; {len(scored)} greedy answers in "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    (ppl_a, answers_a), (ppl_b, answers_b) = results.values()
    differ = sum(a != b for a, b in zip(answers_a, answers_b, strict=True))
    print(
        f"perplexity differs by {100 * abs(ppl_b - ppl_a) / ppl_a:.3f} %; {differ} of {len(answers_a)} answers differ"
    )


if __name__ == "__main__":
    main()
