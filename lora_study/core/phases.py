"""Where a job's wall time goes: named phases, each logged as it ends and summed per stage by
bench/stage_times.py.

  start    the process's creation to the rule script's first line (interpreter, Snakemake's preamble)
  imports  the ML stack and the device
  checks   module resolution, the memory plan, the output-head check
  load     model, adapter and optimizer
  compute  optimizer steps, perplexity forwards, generation, decompositions
  write    outputs and what follows the last marked phase

Overhead is everything but compute.
"""

from __future__ import annotations

import logging
import os
import re
import time

log = logging.getLogger("lora_study")

PHASES = ("start", "imports", "checks", "load", "compute", "write")
COMPUTE = "compute"
LINE = re.compile(r" phase (?P<name>\w+) (?P<seconds>\d+\.\d+) s$")


def process_age_s() -> float:
    """Seconds since this process was created (Linux /proc), 0.0 where that cannot be read."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            # Field 22 counts clock ticks since boot; the command name (field 2) may hold spaces.
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return max(0.0, float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class PhaseClock:
    """Time since the last mark goes to the phase named at the next mark; a phase may be entered again."""

    def __init__(self, since: float | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter() if since is None else since
        self._carved = 0.0
        self.marked = False

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        log.info("phase %s %.3f s", phase, seconds)

    def end(self, phase: str) -> None:
        """The time since the last mark (less what was carved out of it) belonged to `phase`."""
        now = time.perf_counter()
        self.add(phase, max(0.0, now - self._last - self._carved))
        self._last, self._carved, self.marked = now, 0.0, True

    def carve(self, phase: str, seconds: float) -> None:
        """`seconds` inside the current phase belonged to `phase` (a check inside the first batch)."""
        self.add(phase, seconds)
        self._carved += seconds

    def finish(self, rest: str) -> None:
        """The remainder goes to `rest` (or to write once any phase was marked); the total is logged."""
        self.end("write" if self.marked else rest)
        log.info("phase total %.3f s", sum(self.seconds.values()))


_clock: PhaseClock | None = None


def start(age_s: float, since: float) -> PhaseClock:
    """A new clock for this process: the process was `age_s` old at perf_counter() `since` (the rule script's
    first line), its first phase."""
    global _clock
    _clock = PhaseClock(since)
    _clock.add("start", age_s)
    return _clock


def end(phase: str) -> None:
    """Mark the end of `phase` on this process's clock (nothing when no job started one: a direct call)."""
    if _clock is not None:
        _clock.end(phase)


def carve(phase: str, seconds: float) -> None:
    if _clock is not None:
        _clock.carve(phase, seconds)
