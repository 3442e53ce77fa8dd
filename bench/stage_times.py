"""Where a finished study's time went: per stage, the phases its jobs logged (lora_study.phases), and the
overhead (everything but compute) against the wall.

    make clean study && python bench/stage_times.py --wall-s 612
    python bench/stage_times.py --logs /path/to/study/logs --per-job

Prints the CPU capability beside the table (the same study takes very
different times on CPUs with and without native bf16). The wall defaults to
the span of the job logs (first start to last write).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lora_study.phases import COMPUTE, LINE, PHASES  # noqa: E402


def job_phases(log: Path) -> dict[str, float]:
    """The phases one job's log recorded (a job may enter a phase more than once)."""
    seconds: dict[str, float] = defaultdict(float)
    for line in log.read_text(errors="replace").splitlines():
        match = LINE.search(line)
        if match and match["name"] in PHASES:
            seconds[match["name"]] += float(match["seconds"])
    return dict(seconds)


def stage_of(log: Path, logs: Path) -> str:
    relative = log.relative_to(logs)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def log_span_s(logs: list[Path]) -> float:
    """First job start to last log write: the log's own first timestamp is the job's, less its start phase."""
    starts = [log.stat().st_mtime - sum(job_phases(log).values()) for log in logs]
    return max(log.stat().st_mtime for log in logs) - min(starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", type=Path, default=REPO / "logs")
    parser.add_argument("--wall-s", type=float, help="the whole workflow's wall time (default: span of the logs)")
    parser.add_argument("--per-job", action="store_true", help="also one line per job")
    args = parser.parse_args()

    import torch

    from lora_study.precision import detect_capability

    print(f"CPU: {detect_capability(torch.device('cpu')).summary()}; get_cpu_capability() "
          f"{torch.backends.cpu.get_cpu_capability()}; _is_avx512_bf16_supported() "
          f"{torch.cpu._is_avx512_bf16_supported()}")  # fmt: skip
    logs = sorted(log for log in args.logs.rglob("*.log") if job_phases(log))
    if not logs:
        raise SystemExit(f"no job logs with phase lines under {args.logs}")
    stages: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    jobs: dict[str, int] = defaultdict(int)
    header = "| {} | jobs | " + " | ".join(PHASES) + " | total | overhead |"
    rule = "|---|---|" + "---|" * (len(PHASES) + 2)
    if args.per_job:
        print("\n" + header.format("job") + "\n" + rule)
    for log in logs:
        phases, stage = job_phases(log), stage_of(log, args.logs)
        jobs[stage] += 1
        for name, seconds in phases.items():
            stages[stage][name] += seconds
        if args.per_job:
            print(row(str(log.relative_to(args.logs)), 1, phases))
    print("\n" + header.format("stage") + "\n" + rule)
    everything: dict[str, float] = defaultdict(float)
    for stage in sorted(stages, key=lambda s: -sum(stages[s].values())):
        print(row(stage, jobs[stage], stages[stage]))
        for name, seconds in stages[stage].items():
            everything[name] += seconds
    print(row("all jobs", sum(jobs.values()), everything))
    wall = args.wall_s or log_span_s(logs)
    summed = sum(everything.values())
    compute = everything.get(COMPUTE, 0.0)
    overhead = wall - compute
    print(f"\nwall {wall:.0f} s ({wall / 60:.1f} min); summed job time {summed:.0f} s; compute {compute:.0f} s; "
          f"overhead (wall - compute) {overhead:.0f} s = {100 * overhead / wall:.0f} % of the wall")  # fmt: skip


def row(label: str, count: int, phases: dict[str, float]) -> str:
    total = sum(phases.values())
    overhead = total - phases.get(COMPUTE, 0.0)
    cells = " | ".join(f"{phases.get(name, 0.0):.1f}" for name in PHASES)
    return f"| {label} | {count} | {cells} | {total:.1f} | {100 * overhead / total if total else 0:.0f} % |"


if __name__ == "__main__":
    main()
