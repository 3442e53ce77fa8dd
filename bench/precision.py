"""Training throughput per precision recipe on this machine, side by side in one process.

Every recipe trains LoRA r16 on q,k,v,o of the default model through the
workflow's own loading, recipe and loss code (lora_study.training.loading /
precision / loss), on the same random batch, in alternating rounds; the
table gives the median tokens/s per recipe. It then checks that `auto`
resolved to the fastest recipe among the correct candidates of each format
(nf4: compute fp32 or bf16; 16bit: weights fp32 or bf16).

    python bench/precision.py                  # after `snakemake results/model/model.json`
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/precision.py   # an AVX2-only CPU

fp16 is left out on CPU (no CPU of this project computes it natively) unless --fp16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (label, quantization, compute_dtype setting); None: unquantized runs compute in their weight dtype.
RECIPES = [
    ("fp32 weights", "fp32", None),
    ("bf16 weights", "bf16", None),
    ("16bit (auto)", "16bit", None),
    ("nf4, compute fp32", "nf4", "fp32"),
    ("nf4, compute bf16", "nf4", "bf16"),
    ("nf4, compute auto", "nf4", "auto"),
    ("int8, compute auto", "int8", "auto"),
]
FP16_RECIPES = [("fp16 weights", "fp16", None), ("nf4, compute fp16", "nf4", "fp16")]
# Which measured recipes `auto` chooses between, per format.
CANDIDATES = {
    "nf4, compute auto": ("nf4, compute fp32", "nf4, compute bf16"),
    "16bit (auto)": ("fp32 weights", "bf16 weights"),
}


def cpu_report() -> str:
    import torch

    from lora_study.training.precision import detect_capability

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    capability = detect_capability(torch.device("cpu"))
    return (
        f"torch.backends.cpu.get_cpu_capability(): {torch.backends.cpu.get_cpu_capability()}; "
        f"torch.cpu._is_avx512_bf16_supported(): {torch.cpu._is_avx512_bf16_supported()}; AMX tiles: {amx}; "
        f"{capability.summary()}"
    )


def build(manifest: dict, quantization: str, compute: str | None, device):
    from lora_study.study.modules import Targets
    from lora_study.training.loading import add_lora, load_base_model
    from lora_study.training.precision import detect_capability, recipe_for

    recipe = recipe_for(quantization, compute, detect_capability(device))
    model = load_base_model(manifest, recipe, True, "sdpa", device)
    targets = Targets(["q_proj", "k_proj", "v_proj", "o_proj"])
    model = add_lora(model, recipe, targets, 16, 32, 0.05, gradient_checkpointing=False)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, recipe, params


def train_steps(setup, batch, steps: int, device) -> float:
    """Seconds for `steps` optimizer steps (forward, backward, AdamW) under the recipe."""
    import torch

    from lora_study.training.loss import ResponseLoss
    from lora_study.training.precision import GradScaling

    model, recipe, params, optimizer = setup
    loss_fn, scaling = ResponseLoss(model), GradScaling(recipe, device.type)
    start = time.perf_counter()
    for _ in range(steps):
        with recipe.autocast_context(device.type):
            loss, count = loss_fn(batch)
        scaling.backward(loss / count)
        scaling.unscale(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaling.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, default=REPO / "results/model/model.json")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per recipe and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp16", action="store_true", help="also fp16 recipes (emulated, slow on CPU)")
    args = parser.parse_args()

    import torch

    from lora_study.core.io import read_json
    from lora_study.training.batching import collate
    from lora_study.training.loading import pick_device, set_threads

    set_threads(args.threads)
    device = pick_device()
    if not args.manifest.is_file():
        raise SystemExit(f"{args.manifest} not found: run `snakemake results/model/model.json` first")
    manifest = read_json(args.manifest)
    recipes = RECIPES + (FP16_RECIPES if args.fp16 or device.type == "cuda" else [])
    print(cpu_report() if device.type == "cpu" else f"device: {torch.cuda.get_device_name(device)}", flush=True)
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(10, 40000, (args.seq,), generator=generator).tolist(),
             "prompt_length": args.seq // 2} for _ in range(args.batch)]  # fmt: skip
    batch = {k: v.to(device) for k, v in collate(rows, pad_id=0).items()}
    tokens_per_step = args.batch * args.seq

    setups = {}
    for label, quantization, compute in recipes:
        model, recipe, params = build(manifest, quantization, compute, device)
        model.train()
        setups[label] = (model, recipe, params, torch.optim.AdamW(params, lr=1e-4))
        train_steps(setups[label], batch, 1, device)  # warm-up: lazy initialisation, allocator growth
        print(f"loaded {label}: weights {recipe.weight_format}, compute {recipe.compute_dtype}", flush=True)
    speeds: dict[str, list[float]] = {label: [] for label in setups}
    for round_number in range(args.rounds):
        for label, setup in setups.items():
            seconds = train_steps(setup, batch, args.steps, device)
            speeds[label].append(tokens_per_step * args.steps / seconds)
        print(f"round {round_number + 1}/{args.rounds} done", flush=True)

    median = {label: statistics.median(values) for label, values in speeds.items()}
    fastest = max(median.values())
    print(f"\n| recipe | weights | compute | tokens/s (median of {args.rounds}) | vs fastest |")
    print("|---|---|---|---|---|")
    for label, setup in setups.items():
        recipe = setup[1]
        print(f"| {label} | {recipe.weight_format} | {recipe.compute_dtype} | {median[label]:.0f} | "
              f"{median[label] / fastest:.2f} |")  # fmt: skip
    print()
    for auto_label, candidates in CANDIDATES.items():
        chosen = setups[auto_label][1]
        best = max(candidates, key=median.get)
        picked = next(c for c in candidates if setups[c][1].compute_dtype == chosen.compute_dtype)
        verdict = "the fastest" if picked == best else f"NOT the fastest ({best} is)"
        print(f"{auto_label} resolved to {chosen.compute_dtype}: same recipe as '{picked}' "
              f"({median[picked]:.0f} tokens/s), {verdict} of {', '.join(candidates)}.")  # fmt: skip


if __name__ == "__main__":
    main()
