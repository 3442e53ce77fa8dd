"""Atomic writes, JSON/CSV/table files and logging set-up shared by the rule scripts."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `target` only on success.

    Readers never see a half-written file or directory, and a failed job
    leaves nothing a later run would trust.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def read_csv_rows(path: str | Path, key: str) -> dict[str, dict[str, str]]:
    """A CSV's rows (as text) by the value of `key`; light enough for the Snakefile."""
    with Path(path).open(newline="") as handle:
        return {row[key]: row for row in csv.DictReader(handle)}


# Messages the stack prints on every job that are harmless here: bitsandbytes'
# optional CPU kernel package (it would fetch code from a hub; the built-in path
# works) and a deprecation inside transformers' own PEFT integration.
HARMLESS_MESSAGES = ("kernels-community", "is_gradient_checkpointing` is deprecated")


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in HARMLESS_MESSAGES)


def setup_logging(
    log_file: str | Path | None, level: int = logging.INFO, prefix: str = "", append: bool = False
) -> logging.Logger:
    """Log to the job's log file and stderr; route warnings there too. `append`: a process the job started (a
    rank of a sharded run) adds to the job's log, each line after `prefix`."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        if not append:
            Path(log_file).write_text("")
        # Always appending (O_APPEND): the lines of processes a job starts (the ranks of a sharded run) land
        # after its own, never over them.
        handlers.append(logging.FileHandler(log_file, mode="a"))
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {prefix}%(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )
    for handler in handlers:
        handler.addFilter(_DropHarmless())
    logging.captureWarnings(True)
    return logging.getLogger("lora_study")


def write_table(table: pd.DataFrame, csv_path: str | Path, markdown_path: str | Path, columns: tuple[str, ...]) -> None:
    """The whole table as CSV, and its readable `columns` as a Markdown table beside it."""
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    shown = table[[c for c in columns if c in table.columns]]
    with atomic_path(markdown_path) as tmp:
        tmp.write_text(shown.to_markdown(index=False, floatfmt=".4g") + "\n")
