"""An evaluation handed from a run's training job to its evaluate job.

A training job that ends with its trained model in memory can score it right
there, without the evaluate job's second process, imports and model load. It
leaves the result beside the run under a key of everything the evaluate job's
result depends on: the run's settings, the evaluation and compute settings,
the execution device, the model manifest, the bytes of the adapter and of the
validation split, this package's code and the ML stack's versions. The
evaluate job computes the key from its own params and inputs: on a match it
takes the result, otherwise it evaluates as it always did. Either way the
hand-off is removed. Snakemake's rerun decisions do not change: the training
job reads the evaluation settings from the config, never as params, so
editing them reruns only the evaluate jobs (which then find no match).

Nothing here imports torch: an evaluate job that takes a hand-off starts no
ML stack.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from lora_study.core.formats import FOUR_BIT, UNQUANTIZED
from lora_study.study.methods import LORA, RSLORA
from lora_study.study.sweep import RunSpec

log = logging.getLogger("lora_study")

PACKAGE = Path(__file__).resolve().parent.parent
KEY_FILE = "key.json"
STACK = ("torch", "transformers", "peft", "bitsandbytes", "tokenizers", "accelerate", "safetensors", "datasets")
# Settings that change a CPU's arithmetic without changing the config.
DISPATCH_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")

# Runs whose trained model in memory is exactly what the evaluate job loads: plain LoRA and rsLoRA on 4-bit
# or unquantized weights. Left to the evaluate job: DoRA, PiSSA/OLoRA (their saved adapter is converted),
# full fine-tuning, and int8, whose bitsandbytes layers keep state from training.
IN_TRAINING_METHODS = (LORA, RSLORA)
IN_TRAINING_FORMATS = (*FOUR_BIT, *UNQUANTIZED)


def evaluates_in_training(run: RunSpec, config: dict[str, Any]) -> bool:
    """Whether `run`'s training job also scores its model (evaluation.in_training_job, no memory cap: a capped
    evaluation is measured in its own process; one device: a sharded model is evaluated by the evaluate job). The
    evaluate job takes a hand-off only when this holds."""
    training = run.training.to_dict() if run.training else {}
    return (
        bool(config["evaluation"].get("in_training_job", True))
        and run.method in IN_TRAINING_METHODS
        and run.quantization in IN_TRAINING_FORMATS
        and config["evaluation"]["memory_limit_gb"] is None
        and training.get("memory_limit_gb") is None
        and training.get("gpus", 1) == 1
    )


# Snakemake's marker in a directory output, written after the job that made it.
SNAKEMAKE_MARKER = ".snakemake_timestamp"


def tree_digest(directory: Path) -> str:
    """sha256 over a folder's files (Snakemake's marker aside): relative paths and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != SNAKEMAKE_MARKER):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@functools.cache
def code_digest() -> str:
    """This package's code and the ML stack's versions: any change makes an earlier hand-off stale."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes())
    for name in STACK:
        try:
            digest.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} missing".encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def handoff_key(
    run_params: dict[str, Any],
    evaluation: dict[str, Any],
    compute: dict[str, Any],
    device: str | None,
    manifest: dict[str, Any],
    adapter_dir: Path,
    splits_dir: Path,
    threads: int,
) -> dict[str, Any]:
    """Everything an evaluation's result depends on, as one JSON-able record: with the job's threads (a
    different split of a CPU reduction rounds differently) and the CPU dispatch settings of its environment."""
    return {
        "run": run_params,
        "evaluation": evaluation,
        "compute": compute,
        "device": device,
        "threads": threads,
        "dispatch": {name: os.environ.get(name) for name in DISPATCH_VARIABLES},
        "manifest": manifest,
        "adapter": tree_digest(adapter_dir),
        "validation": tree_digest(Path(splits_dir) / "validation"),
        "code": code_digest(),
    }


def leave(directory: Path, key: dict[str, Any], files: dict[str, Path]) -> None:
    """Move `files` (name -> written file) into `directory` with the key, replacing any earlier hand-off
    whole: a reader sees the old one, none, or the new one, never a mix."""
    directory = Path(directory)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, path in files.items():
        os.replace(path, staging / name)
    (staging / KEY_FILE).write_text(json.dumps(key, sort_keys=True))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)


def take(directory: Path, key: dict[str, Any], outputs: dict[str, Path]) -> bool:
    """Move the hand-off's files to `outputs` (name -> output path) when its key is `key`; True if taken.
    The hand-off is removed either way: a stale one is never read twice."""
    directory = Path(directory)
    try:
        left = json.loads((directory / KEY_FILE).read_text())
    except (OSError, ValueError):
        left = None
    taken = left == json.loads(json.dumps(key, sort_keys=True)) and all(
        (directory / name).is_file() for name in outputs
    )
    if taken:
        for name, output in outputs.items():
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            os.replace(directory / name, output)
    elif left is not None:
        changed = sorted(k for k in {*left, *key} if left.get(k) != key.get(k))
        log.info("the training job's evaluation does not apply (changed since: %s): evaluating", ", ".join(changed))
    shutil.rmtree(directory, ignore_errors=True)
    return taken


def discard(directory: Path) -> None:
    """Remove a hand-off the evaluate job must not take (the study no longer evaluates in training)."""
    log.info("the training job's evaluation is not taken (evaluation.in_training_job off or a memory cap set)")
    shutil.rmtree(directory, ignore_errors=True)
