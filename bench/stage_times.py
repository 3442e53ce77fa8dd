"""Wall time of a finished study by stage, from Snakemake's per-job records in benchmarks/.

    make clean study && python bench/stage_times.py --wall-s 612

Prints the CPU capability beside the table (the same study takes very
different times on CPUs with and without native bf16).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAGES = ("prepare_model", "prepare_data", "check_run", "plan", "train", "evaluate", "anatomy", "aggregate", "findings")


def job_seconds(path: Path) -> float:
    with path.open() as handle:
        return float(next(csv.DictReader(handle, delimiter="\t"))["s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--wall-s", type=float, help="the whole workflow's wall time, to print beside the sums")
    args = parser.parse_args()

    import torch

    from lora_study.precision import detect_capability

    print(f"CPU: {detect_capability(torch.device('cpu')).summary()}; get_cpu_capability() "
          f"{torch.backends.cpu.get_cpu_capability()}; _is_avx512_bf16_supported() "
          f"{torch.cpu._is_avx512_bf16_supported()}")  # fmt: skip
    rows, total = [], 0.0
    for stage in STAGES:
        files = [args.benchmarks / f"{stage}.tsv"] if (args.benchmarks / f"{stage}.tsv").exists() else []
        files += sorted((args.benchmarks / stage).glob("*.tsv")) if (args.benchmarks / stage).is_dir() else []
        seconds = sum(job_seconds(f) for f in files)
        total += seconds
        rows.append((stage, len(files), seconds))
    print("\n| stage | jobs | summed job time | share |\n|---|---|---|---|")
    for stage, jobs, seconds in rows:
        print(f"| {stage} | {jobs} | {seconds:.0f} s | {100 * seconds / total:.0f} % |")
    wall = f"{args.wall_s:.0f} s ({args.wall_s / 60:.1f} min)" if args.wall_s else "-"
    print(f"| whole workflow | {sum(r[1] for r in rows)} | {total:.0f} s summed | wall {wall} |")


if __name__ == "__main__":
    main()
