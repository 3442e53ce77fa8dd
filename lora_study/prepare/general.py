"""General text the adapter was not trained on: what a run forgets is the rise of its NLL there over its base's.

The offline default is English prose the Python standard library ships with its documentation (the help topics
of `pydoc_data`, from the Python documentation): it installs with Python, so no third-party text enters the
repository and nothing is downloaded. A local file (.txt: paragraphs separated by blank lines; .jsonl: a "text"
field per line) replaces it. The text is cut into windows of `max_length` tokens, of which `rows` spread evenly
over the text are kept; every token after a window's first is scored. Every evaluation builds the rows itself
(the training job's too, which has no input for them): tokenizing the text takes a fraction of a second.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lora_study.core.errors import UserError

log = logging.getLogger("lora_study")

PYTHON_DOCS = "python-docs"


def python_docs_paragraphs() -> list[str]:
    """The prose paragraphs of the standard library's help topics, in topic order: no code (indented), no
    grammar, no heading underlines."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            lines = [line for line in block.splitlines() if line.strip()]
            if not lines or any(line.startswith((" ", "\t")) for line in lines):
                continue
            if all(set(line.strip()) <= set("*=-~^") for line in lines[1:]) or (len(lines) == 1 and len(block) < 60):
                continue  # a heading and its underline
            paragraphs.append(" ".join(line.strip() for line in lines))
    return paragraphs


def file_paragraphs(path: Path) -> list[str]:
    if not path.exists():
        raise UserError(f"evaluation.forgetting.source: no such file {path}")
    if path.suffix == ".jsonl":
        return [str(json.loads(line)["text"]) for line in path.read_text().splitlines() if line.strip()]
    return [block.strip() for block in path.read_text().split("\n\n") if block.strip()]


def general_paragraphs(source: str) -> list[str]:
    return python_docs_paragraphs() if source == PYTHON_DOCS else file_paragraphs(Path(source))


def general_rows(paragraphs: list[str], tokenizer, rows: int, max_length: int) -> list[dict[str, Any]]:
    """`rows` windows of `max_length` tokens spread evenly over the text (one stream, paragraphs joined by blank
    lines); the first token of each is context only (prompt_length 1), the rest are scored."""
    ids: list[int] = []
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for paragraph in paragraphs:
        ids += tokenizer(paragraph, add_special_tokens=False)["input_ids"] + separator
    windows = len(ids) // max_length
    if windows < rows:
        raise UserError(f"evaluation.forgetting: the text gives {windows} windows of {max_length} tokens, fewer "
                        f"than rows {rows}: lower rows or max_length, or give more text")  # fmt: skip
    starts = [(i * windows // rows) * max_length for i in range(rows)]
    return [{"input_ids": ids[start : start + max_length], "prompt_length": 1} for start in starts]


def general_split(settings: dict[str, Any], tokenizer) -> list[dict[str, Any]]:
    """The general text's scored rows under evaluation.forgetting `settings` (built where they are scored: the
    same rows from the same settings and tokenizer in every evaluation, in a fraction of a second)."""
    paragraphs = general_paragraphs(settings["source"])
    return general_rows(paragraphs, tokenizer, settings["rows"], settings["max_length"])
