"""GPU check: the reference study's grid on a randomly initialised Phi-2.

Memory and speed do not depend on the weights' values, so a model with
Phi-2's exact configuration (2.7B parameters) and random weights measures what
the real one would, without downloading it. Each configuration trains in its
own process through this project's training code (the same function the
workflow's train jobs call), at the reference settings: batch 2, gradient
accumulation 4, sequences of 512 tokens, a fixed number of steps. The table
gives peak VRAM three ways (torch max allocated, torch max reserved, NVML
used), useful (loss-bearing) tokens/s and the planner's prediction.

    python bench/gpu_check.py --out bench/results/gpu_check.md          # CUDA, Phi-2
    python bench/gpu_check.py --configs 4 --steps 6 --out /tmp/check.md  # a first pass: ~5 min on an H100
    python bench/gpu_check.py --tiny --steps 2 --out /tmp/gpu_check.md   # CPU smoke run
    python bench/gpu_check.py --plan-only --out /tmp/phi2_plan.md        # planner only, any machine

The table is rewritten after every configuration (a check cut short keeps what
it measured), and a configuration that fails is a row with its error, not the
end of the check. After the grid come three checks of the GPU path itself:
two jobs started together must hold different GPUs (different device UUIDs,
where two or more are visible), a run under a memory cap far below its need must
come back as status "oom" (data, not a crash), and every row says which dtype
`auto` resolved to and how the per-process figure compares with torch's. Last, with
two or more GPUs (or on a CPU with --tiny: two processes over gloo), the first
configuration sharded over two devices (training.gpus: 2, FSDP2) beside the same
run on one device, both with torch's AdamW: its per-rank peaks and the largest
difference between their loss curves; with one GPU that row says it was skipped.

`--tiny` swaps in a 2-layer model with Phi-2's architecture and small widths,
so the whole path (model build, quantization, LoRA, planner, table) runs on a
CPU in about a minute.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Phi-2 (microsoft/phi-2 config.json), reproduced by value.
PHI2 = {
    "vocab_size": 51200,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "partial_rotary_factor": 0.4,
    "rope_theta": 10000.0,
    "layer_norm_eps": 1e-5,
    "hidden_act": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.0,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}
TINY = {**PHI2, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip

# The reference study's grid: ranks on q,k,v,o NF4; module sets at rank 16; quantizations at rank 16.
GRID = [
    *[(rank, ["q", "k", "v", "o"], "nf4") for rank in (4, 8, 16, 32, 64)],
    (16, ["q", "v"], "nf4"),
    (16, ["q", "k", "v"], "nf4"),
    (16, ["q", "k", "v", "o", "mlp"], "nf4"),
    (16, ["q", "k", "v", "o"], "int8"),
    (16, ["q", "k", "v", "o"], "16bit"),
]
REFERENCE = {"batch_size": 2, "gradient_accumulation_steps": 4, "seq_len": 512}

# The options this check runs with (reported beside the table).
OPTIONS = {
    "compute_dtype": "auto",
    "attn_implementation": "sdpa",
    "gradient_checkpointing": True,
    "optimizer": "paged_adamw_8bit",
}


def build_model(out_dir: Path, shape: dict) -> dict:
    """Random Phi weights (safetensors), a word-level tokenizer, and the workflow's manifest."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

    from lora_study.prepare.model_source import describe_model

    config = PhiConfig(**shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = PhiForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t0", pad_token="t0"
    )
    tokenizer.save_pretrained(out_dir)
    return describe_model(out_dir, f"random {config.model_type} {sum(p.numel() for p in model.parameters()):,}", False)


def build_data(out_dir: Path, vocab_size: int, rows: int, seq_len: int) -> None:
    """Fixed-length rows of random tokens; the second half of each row is the response."""
    import random

    from datasets import Dataset

    rng = random.Random(0)
    records = [
        {
            "input_ids": [rng.randrange(1, vocab_size) for _ in range(seq_len)],
            "prompt_length": seq_len // 2,
            "answer": "",
            "family": "",
        }
        for _ in range(rows)
    ]
    for split in ("train", "validation"):
        Dataset.from_list(records).save_to_disk(str(out_dir / split))


def run_config(args: argparse.Namespace) -> None:
    """Child process: claim a GPU as a workflow job does (first), train one configuration, print its metrics."""
    from lora_study.core.gpu_slots import claim_job_gpu

    slot = claim_job_gpu()  # before anything imports CUDA-touching modules
    from lora_study.core.io import read_json
    from lora_study.core.metrics import torch_device_uuid
    from lora_study.study.sweep import RunSpec
    from lora_study.training.loop import TrainOutputs, train_run

    job = json.loads(args.one)
    work = Path(job["work"])
    run = RunSpec.from_params(job["run"])
    run_dir = work / "runs" / job.get("label", run.run_id)
    metrics = train_run(
        run=run,
        manifest=read_json(work / "manifest.json"),
        splits_dir=work / "splits",
        outputs=TrainOutputs(run_dir / "adapter", run_dir / "train_metrics.json", run_dir / "loss_curve.csv"),
        threads=args.threads,
        checkpoint_dir=work / "checkpoints" / job.get("label", run.run_id),
        plan_settings={"device": job["plan_device"], "memory_budget_gb": None},
    )
    import torch

    uuid = torch_device_uuid(torch.device("cuda", 0)) if torch.cuda.is_available() else None
    print("RESULT " + json.dumps({**metrics.to_dict(), "device_uuid": uuid, "gpu_slot": slot.device if slot else None},
                                 default=str))  # fmt: skip


def start_child(args: argparse.Namespace, job: dict, threads: int | None = None) -> subprocess.Popen:
    command = [sys.executable, __file__, "--one", json.dumps(job), "--threads", str(threads or args.threads), "--out",
               str(args.out)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_child(child: subprocess.Popen, label: str, options: dict) -> dict:
    """The child's table row; a failed child is a row with status "failed" and the last line of its error."""
    stdout, stderr = child.communicate()
    result = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode == 0 and result:
        return {"check": label, **table_row(json.loads(result[0][len("RESULT ") :]), options)}
    lines = [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line]  # no progress bars
    error = f"exit {child.returncode}: {lines[-1] if lines else 'no message'}"
    print(stderr[-4000:], file=sys.stderr, flush=True)
    return {"check": label, "status": "failed", "error": error[:300]}


def record_sharded(args, work: Path, job, first: tuple, options: dict, record, plan_device: str) -> None:
    """The first configuration on two devices (FSDP2) beside the same run on one, both with torch's AdamW."""
    import torch

    if plan_device == "cuda" and torch.cuda.device_count() < 2:
        record({"check": "sharded over 2 GPUs", "status": "skipped", "error": "one GPU visible: needs two"})
        return
    one = finish_child(start_child(args, job(*first, label="one-device", optimizer="adamw")), "one device (adamw)",
                       options)  # fmt: skip
    record(one)
    from lora_study.training.sharded import launch

    spec = job(*first, label="sharded", optimizer="adamw", gpus=2)
    run_dir = work / "runs" / "sharded"
    arguments = {"run": spec["run"], "manifest": json.loads((work / "manifest.json").read_text()),
                 "splits_dir": str(work / "splits"),
                 "outputs": [str(run_dir / "adapter"), str(run_dir / "train_metrics.json"),
                             str(run_dir / "loss_curve.csv")],
                 "checkpoint_dir": str(work / "checkpoints" / "sharded"), "checkpoint_every": 0,
                 "plan_settings": {"device": plan_device, "memory_budget_gb": None}, "measurement": None}  # fmt: skip
    try:
        launch(arguments, 2, args.threads, None)
    except RuntimeError as error:
        record({"check": "sharded over 2 devices", "status": "failed", "error": str(error)[:300]})
        return
    import pandas as pd

    metrics = json.loads((run_dir / "train_metrics.json").read_text())
    curves = [pd.read_csv(work / "runs" / label / "loss_curve.csv")["loss"] for label in ("one-device", "sharded")]
    difference = float(((curves[1] - curves[0]).abs() / curves[0]).max())
    record({"check": "sharded over 2 devices", **table_row(metrics, options),
            "rank_peak_memory_gb": metrics["memory"].get("rank_peak_memory_gb"),
            "loss_vs_one_device": f"{difference:.2g} relative (largest step)"})  # fmt: skip


def run_spec(rank: int, modules: list[str], quantization: str, training: dict):
    from lora_study.core.formats import applies_compute_dtype
    from lora_study.study.modules import canonical_modules
    from lora_study.study.settings import TrainingSettings
    from lora_study.study.sweep import RunSpec, run_id

    ordered = tuple(canonical_modules(modules))
    double_quant = quantization == "nf4"
    if not applies_compute_dtype(quantization):
        training = {k: v for k, v in training.items() if k != "compute_dtype"}
    return RunSpec(run_id(rank, 2 * rank, ordered, quantization, double_quant), rank, 2.0 * rank, ordered,
                   quantization, double_quant, TrainingSettings.from_dict(training))  # fmt: skip


def table_row(metrics: dict, options: dict) -> dict:
    from lora_study.questions.memory_plan import measured_device

    memory, plan = metrics["memory"], metrics.get("memory_plan") or {}
    return {
        "run_id": metrics["run_id"],
        "status": metrics["status"],
        "cuda_max_allocated_gb": memory.get("cuda_max_allocated_gb"),
        "cuda_max_reserved_gb": memory.get("cuda_max_reserved_gb"),
        "nvml_process_peak_gb": memory.get("nvml_process_peak_gb"),
        "nvml_device_peak_gb": memory.get("nvml_device_peak_gb"),
        "peak_memory_gb": memory.get("peak_memory_gb"),
        "memory_kind": memory.get("memory_kind"),
        "planned_cuda_gb": plan.get("predicted_cuda_gb"),
        "planned_cpu_gb": plan.get("predicted_cpu_gb"),
        "useful_tokens_per_s": metrics.get("loss_tokens_per_s"),
        "train_tokens_per_s": metrics.get("train_tokens_per_s"),
        "trainable_params": metrics.get("trainable_params"),
        "compute_dtype": metrics.get("compute_dtype"),
        "weight_format": metrics.get("weight_format"),
        "steady_steps": metrics.get("throughput_steps"),
        "device_uuid": metrics.get("device_uuid"),
        "gpu_slot": metrics.get("gpu_slot"),
        # The planner against the figure it predicts, and NVML's per-process figure against torch's reserve.
        "plan_error_pct": _pct(
            plan.get(f"predicted_{measured_device(memory.get('memory_kind'))}_gb"), memory.get("peak_memory_gb")
        ),
        "process_vs_reserved_pct": _pct(memory.get("nvml_process_peak_gb"), memory.get("cuda_max_reserved_gb")),
        **{f"option.{k}": v for k, v in options.items()},
    }


def _pct(value: float | None, reference: float | None) -> float | None:
    return 100 * (value / reference - 1) if value and reference else None


def plan_only(args: argparse.Namespace) -> None:
    """Predicted peak CUDA memory of the grid on Phi-2, with and without gradient checkpointing."""
    import pandas as pd
    from transformers import PhiConfig

    from lora_study.study.config import validate_config
    from lora_study.study.modules import ARCHITECTURES, linear_layer_names, meta_model, resolve_targets
    from lora_study.training.planner import BatchShape, model_facts, plan_run, planning_recipe

    config = PhiConfig(**(TINY if args.tiny else PHI2))
    facts = model_facts(config)
    layers = linear_layer_names(meta_model(config))
    base = validate_config({"model": {"source": "x"}, "dataset": {"source": "generated"}, "sweep": {}})["training"]
    batch = BatchShape(
        REFERENCE["batch_size"], REFERENCE["seq_len"], REFERENCE["batch_size"] * REFERENCE["seq_len"] // 2
    )
    rows = []
    for checkpointing in (False, True):
        training = {**base, **OPTIONS, "gradient_checkpointing": checkpointing, "batch_size": REFERENCE["batch_size"]}
        for rank, modules, quantization in GRID[: args.configs]:
            run = run_spec(rank, modules, quantization, training)
            targets = resolve_targets(ARCHITECTURES["phi"], run.modules, layers, "phi")
            plan = plan_run(run, planning_recipe(run, "cuda"), config, facts, targets, batch, "cuda", None)
            rows.append({"gradient_checkpointing": checkpointing, **{k: v for k, v in plan.to_dict().items()
                         if k not in ("plan_device", "budget_gb", "skip", "predicted_gb")}})  # fmt: skip
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    args.out.write_text(
        f"# Planner: Phi-2 configuration, batch {REFERENCE['batch_size']} x {REFERENCE['seq_len']} tokens "
        "(half of each row a response), predictions only\n\n" + table.to_markdown(index=False, floatfmt=".3g") + "\n"
    )
    print(args.out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small Phi-architecture model (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", type=int, default=len(GRID), help="first N configurations of the grid")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, required=True, help="markdown table; a .csv is written beside it")
    parser.add_argument("--plan-only", action="store_true", help="the planner's predictions only: no weights, no GPU")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_config(args)
        return
    if args.plan_only:
        plan_only(args)
        return

    import torch

    from lora_study.study.config import validate_config

    shape = TINY if args.tiny else PHI2
    options = {**OPTIONS, "gradient_checkpointing": not args.no_gradient_checkpointing}
    training = validate_config({"model": {"source": "x"}, "dataset": {"source": "generated"}, "sweep": {}})["training"]
    training.update(options, max_steps=args.steps, warmup_steps=0, log_every=max(1, args.steps // 2),
                    batch_size=REFERENCE["batch_size"],
                    gradient_accumulation_steps=REFERENCE["gradient_accumulation_steps"])  # fmt: skip
    plan_device = "cuda" if torch.cuda.is_available() else "cpu"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        manifest = build_model(work / "model", shape)
        (work / "manifest.json").write_text(json.dumps(manifest))
        build_data(work / "splits", shape["vocab_size"], rows=64, seq_len=REFERENCE["seq_len"])
        print(f"model: {manifest['source']} parameters; device: {plan_device}", flush=True)
        header = (
            f"# GPU check: {manifest['source']} parameters, random weights\n\n"
            f"Batch {REFERENCE['batch_size']} x accumulation {REFERENCE['gradient_accumulation_steps']}, "
            f"{REFERENCE['seq_len']} tokens per row, {args.steps} steps per configuration, device {plan_device}. "
            f"Options: {', '.join(f'{k}={v}' for k, v in options.items())}.\n\n"
        )

        def job(rank: int, modules: list[str], quantization: str, label: str, **changes) -> dict:
            run = run_spec(rank, modules, quantization, {**training, **changes}).as_params()
            return {"work": str(work), "run": run, "plan_device": plan_device, "label": label}

        def record(row: dict) -> None:
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
            write_table(args.out, header, rows)  # after every row: a check cut short keeps what it measured

        for rank, modules, quantization in GRID[: args.configs]:
            label = run_spec(rank, modules, quantization, training).run_id
            record(finish_child(start_child(args, job(rank, modules, quantization, label)), "grid", options))
        first = GRID[0]
        # Two jobs at once: with two or more GPUs visible they must hold different ones.
        pair = [start_child(args, job(*first, label=f"concurrent-{i}")) for i in range(2)]
        for i, child in enumerate(pair):
            record(finish_child(child, f"concurrent {i + 1} of 2", options))
        # Far too little memory: the run must end as status "oom", a result. One thread: on a CPU, OpenMP
        # aborts the process when the cap leaves no room for its worker threads' stacks.
        record(finish_child(start_child(args, job(*first, label="oom-probe", memory_limit_gb=0.001), threads=1),
                            "memory cap 0.001 GB", options))  # fmt: skip
        record_sharded(args, work, job, first, options, record, plan_device)
    print(summary(rows, plan_device), flush=True)
    write_table(args.out, header, rows, summary(rows, plan_device))
    print(f"wrote {args.out}")


def write_table(out: Path, header: str, rows: list[dict], footer: str = "") -> None:
    import pandas as pd

    table = pd.DataFrame(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False)
    shown = table.drop(columns=[c for c in table.columns if c.startswith("option.")])
    out.write_text(header + shown.to_markdown(index=False, floatfmt=".3g") + "\n" + (f"\n{footer}\n" if footer else ""))


def summary(rows: list[dict], device: str) -> str:
    """The GPU-path checks in words: distinct GPUs for concurrent jobs, the OOM probe, dtypes, failures."""
    pair = [r for r in rows if str(r.get("check", "")).startswith("concurrent")]
    uuids = {r.get("device_uuid") for r in pair}
    if device != "cuda":
        concurrent = "concurrent jobs: no GPU here, nothing to tell apart"
    elif None in uuids or len(pair) < 2:
        concurrent = "concurrent jobs: a device UUID is missing"
    else:
        slots = {r.get("gpu_slot") for r in pair}
        verdict = "different GPUs" if len(uuids) == 2 else "the same GPU (expected with one GPU visible)"
        concurrent = (
            f"concurrent jobs: {verdict} ({', '.join(sorted(map(str, uuids)))}; slots {sorted(map(str, slots))})"
        )
    probe = next((r for r in rows if r.get("check") == "memory cap 0.001 GB"), {})
    if device == "cuda":
        expected = "as expected" if probe.get("status") == "oom" else "NOT oom"
        oom = f"memory-capped run: status {probe.get('status')} ({expected})"
    else:  # RLIMIT_AS: native code (OpenMP, bitsandbytes) may abort instead of raising; the CUDA cap is the check
        oom = f"memory-capped run: status {probe.get('status')} (CPU address-space cap: informative only)"
    dtypes = sorted({f"{r.get('weight_format')}->{r.get('compute_dtype')}" for r in rows if r.get("compute_dtype")})
    failed = [r.get("check") + " " + str(r.get("run_id", "")) for r in rows if r.get("status") == "failed"]
    return "; ".join([concurrent, oom, "resolved formats: " + ", ".join(dtypes),
                      f"failed: {', '.join(failed) if failed else 'none'}"]) + "."  # fmt: skip


if __name__ == "__main__":
    main()
