"""Calibration of the verdicts: error rates, power and coverage on simulated studies with a known truth.

Every scenario (lora_study/stats/calibration.py) is simulated `--datasets` times and
fed through the findings' own Judge; the table gives, per scenario, the false
better/worse rate with no true difference (nominal 5 %), the rate of
"equivalent" with no difference (tolerance 2 %), power at a real +5 % change in
perplexity and the coverage of the printed 95 % interval, plus the coverage of a
configuration's own accuracy interval.

    python bench/calibration.py                              # 2000 data sets per scenario
    python bench/calibration.py --baseline old_verdicts.py   # the same data through another verdicts.py

`--baseline` takes a verdicts.py of an earlier commit (for instance
`git show <commit>:lora_study/stats/verdicts.py > /tmp/old_verdicts.py`), so a change
to the verdicts is judged on identical simulated data.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COLUMNS = ("false better/worse", "equivalent (null)", "power at +5%", "coverage")


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"baseline_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def cell(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def markdown(rows: list[dict], baseline: list[dict] | None) -> str:
    header = ["scenario", *COLUMNS]
    if baseline:
        header = ["scenario", *(f"{c} (now / before)" for c in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in enumerate(rows):
        if baseline:
            old = baseline[index]
            values = [f"{cell(row.get(c))} / {cell(old.get(c))}".strip(" /") for c in COLUMNS]
        else:
            values = [cell(row.get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join([row["scenario"], *values]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=2000, help="simulated studies per scenario and truth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", type=Path, help="another verdicts.py to run on the same simulated data")
    args = parser.parse_args()

    import torch

    from lora_study.stats import calibration, verdicts

    start = time.perf_counter()
    rows = calibration.calibration_table(args.datasets, verdicts, args.seed)
    seconds = time.perf_counter() - start
    baseline = calibration.calibration_table(args.datasets, load_module(args.baseline), args.seed) if args.baseline \
        else None  # fmt: skip
    print(f"{args.datasets} simulated studies per scenario and truth, seed {args.seed}; nominal level 5 %, "
          f"tolerance {calibration.TOLERANCE:.0%}, {calibration.ROWS} validation rows, "
          f"{calibration.PROMPTS} prompts")  # fmt: skip
    print(markdown(rows, baseline))
    print(f"\n{seconds:.1f} s; CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{torch.cpu._is_avx512_bf16_supported()}")  # fmt: skip


if __name__ == "__main__":
    main()
