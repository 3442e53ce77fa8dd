"""Evaluating a 4-bit run on CPU three ways, side by side: bitsandbytes' fused CPU kernel (what it switches
to in eval mode on CPUs with AVX512-BF16), its dequantize-then-matmul at every call (training's arithmetic,
what evaluation uses: lora_study.training.loading.compute_4bit_as_in_training), and the weights dequantized once
into plain linear layers.

    snakemake --cores 2 results/runs/r16-qkvo-nf4/train_metrics.json
    python bench/eval_4bit_paths.py --run r16-qkvo-nf4
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/eval_4bit_paths.py --run r16-qkvo-nf4

Prints, per path, the perplexity over the validation split and the greedy
answers' time, then per pair the perplexity difference and how many answers
differ. "Dequantized once" as written here casts a layer's output to the
compute dtype where bitsandbytes casts it back to the input's, so it is not
the same arithmetic; it also holds every weight unpacked, which would change
the memory an NF4 evaluation measures.
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


def dequantize_per_call(model: torch.nn.Module) -> int:
    """bitsandbytes' own default path: dequantize every weight at each call, then matmul (what training does),
    instead of the fused CPU kernel it switches to in eval mode on CPUs with AVX512-BF16."""
    from bitsandbytes.nn import Linear4bit

    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("."))
    parser.add_argument("--run", default="r16-qkvo-nf4")
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args()

    from lora_study.core.io import read_json
    from lora_study.measure.evaluate import exact_answer_indices, greedy_answers, response_nll
    from lora_study.prepare.data import load_split
    from lora_study.training.loading import load_for_evaluation, load_tokenizer
    from lora_study.training.loss import SHORTCUT, ResponseLoss
    from lora_study.training.precision import detect_capability, recipe_for

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
    for path in ("kernels", "dequantized per call", "dequantized once"):
        model = load_for_evaluation(manifest, recipe, True, "sdpa", cpu, adapter)
        if path == "dequantized per call":
            dequantize_per_call(model)
        elif path == "dequantized once":
            dequantize_once(model, recipe.torch_compute_dtype)
        started = time.perf_counter()
        nll, tokens = response_nll(ResponseLoss(model, SHORTCUT), rows, 16, pad_id, cpu, recipe)
        perplexity_s = time.perf_counter() - started
        started = time.perf_counter()
        answers = greedy_answers(model, scored, 16, 20, tokenizer, pad_id, cpu, recipe)
        results[path] = (math.exp(math.fsum(nll) / sum(tokens)), answers)
        print(f"{path}: perplexity {results[path][0]:.6f} in {perplexity_s:.1f} s; {len(scored)} greedy answers in "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    paths = list(results)
    for index, first in enumerate(paths):
        for second in paths[index + 1 :]:
            (ppl_a, answers_a), (ppl_b, answers_b) = results[first], results[second]
            differ = sum(a != b for a, b in zip(answers_a, answers_b, strict=True))
            print(f"{first} vs {second}: perplexity differs by {100 * abs(ppl_b - ppl_a) / ppl_a:.4f} %; "
                  f"{differ} of {len(answers_a)} answers differ")  # fmt: skip


if __name__ == "__main__":
    main()
