"""How many GPUs a QLoRA run needs: the memory planner's per-GPU prediction for one configuration on
Phi-2-, Llama-3-8B- and Llama-3-70B-shaped models (configurations only: no weights), sharded over 1, 2, 4
and 8 GPUs, and the fewest GPUs of each memory size that hold it.

    python bench/sharded_plan.py [--seq-len 1024] [--batch 1] [--budgets 16 24 40 80]

The run: NF4 with double quantization, LoRA rank 16 on q, k, v, o, bf16 compute, gradient checkpointing,
8-bit paged AdamW on one GPU and torch's AdamW when sharded (bitsandbytes' 8-bit optimizers cannot update sharded
parameters: the workflow refuses them there), SDPA, planned for CUDA (NVML's per-process figure: context and
allocator slack included).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_check import PHI2, run_spec  # noqa: E402

# Public config.json values, reproduced by value (no download).
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False)  # fmt: skip
LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
MODELS = {"Phi-2": ("phi", PHI2), "Llama-3-8B": ("llama", LLAMA3_8B), "Llama-3-70B": ("llama", LLAMA3_70B)}
GPUS = (1, 2, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budgets", type=float, nargs="+", default=[16, 24, 40, 80])
    args = parser.parse_args()

    import pandas as pd
    from transformers import LlamaConfig, PhiConfig

    from lora_study.study.config import validate_config
    from lora_study.study.modules import ARCHITECTURES, linear_layer_names, meta_model, resolve_targets
    from lora_study.training.planner import BatchShape, model_facts, plan_run, planning_recipe

    base = validate_config({"model": {"source": "x"}, "dataset": {"source": "generated"}, "sweep": {}})["training"]
    options = {"compute_dtype": "bf16", "attn_implementation": "sdpa", "gradient_checkpointing": True,
               "optimizer": "paged_adamw_8bit", "batch_size": max(args.batch, max(GPUS))}  # fmt: skip
    rows = []
    for name, (family, values) in MODELS.items():
        config = (PhiConfig if family == "phi" else LlamaConfig)(**values)
        facts = model_facts(config)
        layers = linear_layer_names(meta_model(config))
        for gpus in GPUS:
            # The global batch stays `--batch` rows per GPU times N: each GPU sees --batch rows.
            batch = BatchShape(args.batch * gpus, args.seq_len, args.batch * gpus * args.seq_len // 2)
            optimizer = options["optimizer"] if gpus == 1 else "adamw"
            run = run_spec(16, ["q", "k", "v", "o"], "nf4", {**base, **options, "gpus": gpus, "optimizer": optimizer})
            targets = resolve_targets(ARCHITECTURES[family], run.modules, layers, family)
            plan = plan_run(run, planning_recipe(run, "cuda"), config, facts, targets, batch, "cuda", None)
            rows.append({"model": name, "params_b": facts.total_params / 1e9, "gpus": gpus,
                         "per_gpu_gb": plan.predicted_cuda_gb, "weights_gb": plan.weights_gb,
                         "gathered_gb": plan.gathered_gb, "lora_states_gb": plan.lora_states_gb,
                         "activations_gb": plan.activations_gb + plan.backward_working_gb,
                         "logits_gb": plan.logits_gb})  # fmt: skip
    table = pd.DataFrame(rows)
    print(f"Per-GPU prediction, batch {args.batch} x {args.seq_len} tokens per GPU (half a response), NF4 r16 "
          "q,k,v,o, bf16, gradient checkpointing, paged 8-bit AdamW on 1 GPU, AdamW sharded\n")  # fmt: skip
    print(table.to_markdown(index=False, floatfmt=".3g"))
    print()
    needed = []
    for name, group in table.groupby("model", sort=False):
        fits = {f"{budget:g} GB": next((f"{int(r.gpus)} x" for r in group.itertuples() if r.per_gpu_gb <= budget),
                                       f"> {max(GPUS)}") for budget in args.budgets}  # fmt: skip
        needed.append({"model": name, **fits})
    print("GPUs needed per GPU memory size\n")
    print(pd.DataFrame(needed).to_markdown(index=False))


if __name__ == "__main__":
    main()
