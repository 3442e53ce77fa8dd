"""Where a finished study's time went: per stage, the phases its jobs logged (lora_study.core.phases), and the
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

from lora_study.core.phases import COMPUTE, LINE, PHASES  # noqa: E402


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


def log_span_s(phases_by_log: dict[Path, dict[str, float]]) -> float:
    """First job start to last log write: each log was last written when its job ended, its phases earlier."""
    starts = [log.stat().st_mtime - sum(phases.values()) for log, phases in phases_by_log.items()]
    return max(log.stat().st_mtime for log in phases_by_log) - min(starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", type=Path, default=REPO / "logs")
    parser.add_argument("--wall-s", type=float, help="the whole workflow's wall time (default: span of the logs)")
    parser.add_argument("--per-job", action="store_true", help="also one line per job")
    args = parser.parse_args()

    import torch

    from lora_study.training.precision import detect_capability

    print(f"CPU: {detect_capability(torch.device('cpu')).summary()}; get_cpu_capability() "
          f"{torch.backends.cpu.get_cpu_capability()}; _is_avx512_bf16_supported() "
          f"{torch.cpu._is_avx512_bf16_supported()}")  # fmt: skip
    phases_by_log = {log: found for log in sorted(args.logs.rglob("*.log")) if (found := job_phases(log))}
    if not phases_by_log:
        raise SystemExit(f"no job logs with phase lines under {args.logs}")
    stages: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    jobs: dict[str, int] = defaultdict(int)
    header = "| {} | jobs | " + " | ".join(PHASES) + " | total | overhead |"
    rule = "|---|---|" + "---|" * (len(PHASES) + 2)
    if args.per_job:
        print("\n" + header.format("job") + "\n" + rule)
    for log, phases in phases_by_log.items():
        stage = stage_of(log, args.logs)
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
    wall = args.wall_s or log_span_s(phases_by_log)
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
