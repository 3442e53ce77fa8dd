"""Alpaca-format data: load, format with a prompt template, tokenize, split."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from lora_study.core.errors import UserError
from lora_study.prepare.datagen import generate_examples

log = logging.getLogger("lora_study")

REQUIRED_COLUMNS = ("instruction", "output")
GENERATED_SOURCE = "generated"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# The Alpaca prompt layout (instruction, optional input, response).
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task{context}. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_WITH_INPUT = (
    ALPACA_PREAMBLE.format(context=", paired with an input that provides further context")
    + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = ALPACA_PREAMBLE.format(context="") + "### Instruction:\n{instruction}\n\n### Response:\n"


class DataError(UserError):
    """The data set cannot be used; the message names the file, column or row."""


def load_records(dataset_config: dict[str, Any]) -> list[dict[str, str]]:
    """Rows with instruction, input, output (and family for generated data)."""
    source = dataset_config["source"]
    if source == GENERATED_SOURCE:
        return generate_examples(dataset_config["generated_examples"], dataset_config["seed"])
    path = Path(source)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise DataError(f"dataset.source: file not found: {path}")
        rows = _load_local(path)
    else:
        from datasets import load_dataset

        rows = list(load_dataset(source, split=dataset_config["split"]))
    return _check_columns(rows, source, dataset_config.get("exact_answers", False))


def _load_local(path: Path) -> list[dict[str, Any]]:
    from datasets import load_dataset

    if LOCAL_FORMATS[path.suffix] == "json":
        _check_text(path)
    try:
        loaded = load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parse errors in many types
        raise DataError(f"dataset.source: cannot read {path}: {error}") from error
    return list(loaded)


def _check_text(path: Path) -> None:
    """JSON data must be non-empty UTF-8; say where it is not, before a parser's vaguer error."""
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"dataset.source: {path} has no rows")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"dataset.source: {path} is not UTF-8 text: line {line}, byte {error.start}") from None
    if text.lstrip().startswith("["):
        _check_json_array(path, text)
    else:
        _check_json_lines(path, text)


def _check_json_array(path: Path, text: str) -> None:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"dataset.source: {path} line {error.lineno}, column {error.colno}: {error.msg}") from None
    for number, row in enumerate(rows, 1):
        _check_row(row, f"{path} row {number}")


def _check_json_lines(path: Path, text: str) -> None:
    """One JSON object per line: name the first line that is not one, and why."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"dataset.source: {path} line {number} is not valid JSON ({error.msg} at column {error.colno}): "
                f"{line[:80]!r}"
            ) from None
        _check_row(row, f"{path} line {number}")


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"dataset.source: {where} is a JSON {type(row).__name__}, not an object with "
                        f"{' and '.join(REQUIRED_COLUMNS)}")  # fmt: skip
    missing = [column for column in REQUIRED_COLUMNS if row.get(column) is None]
    if missing:
        named = ", ".join(repr(column) for column in missing)
        raise DataError(f"dataset.source: {where} has no {named}; its keys: {sorted(row)}")


# The family of rows declared exact by dataset.exact_answers that have none of their own.
EXACT_FAMILY = "all"


def _check_columns(rows: list[dict[str, Any]], source: str, exact_answers: bool = False) -> list[dict[str, str]]:
    """Rows as plain strings. `family` marks an exact answer (scored by exact match); with
    `exact_answers` every row is one."""
    if not rows:
        raise DataError(f"dataset.source: {source} has no rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise DataError(f"dataset.source: {source} lacks column(s) {missing}; has {sorted(rows[0])}")
    return [
        {
            "instruction": str(row["instruction"]),
            "input": str(row.get("input") or ""),
            "output": str(row["output"]),
            "family": str(row.get("family") or (EXACT_FAMILY if exact_answers else "")),
        }
        for row in rows
    ]


def format_prompt(record: dict[str, str], template: str, tokenizer) -> str:
    """The prompt text up to where the response starts."""
    if template == "alpaca":
        layout = ALPACA_WITH_INPUT if record["input"] else ALPACA_NO_INPUT
        return layout.format(instruction=record["instruction"], input=record["input"])
    content = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def tokenize_record(record: dict[str, str], template: str, tokenizer) -> dict[str, Any]:
    """Prompt and response ids; the response ends with EOS so the model learns to stop."""
    prompt = format_prompt(record, template, tokenizer)
    # The chat template writes its own special tokens; Alpaca text gets the tokenizer's.
    prompt_ids = tokenizer(prompt, add_special_tokens=template == "alpaca")["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    input_ids = prompt_ids + response_ids + [tokenizer.eos_token_id]
    return {
        "input_ids": input_ids,
        "prompt_length": len(prompt_ids),
        "answer": record["output"],
        "family": record["family"],
    }


def split_records(
    tokenized: list[dict[str, Any]], validation_size: int, max_train: int | None, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    order = list(range(len(tokenized)))
    random.Random(seed).shuffle(order)
    if len(order) <= validation_size:
        raise DataError(
            f"dataset.validation_size {validation_size} leaves no training rows (only {len(order)} usable rows)"
        )
    validation = [tokenized[i] for i in order[:validation_size]]
    train = [tokenized[i] for i in order[validation_size:]]
    return (train[:max_train] if max_train else train), validation


def prepare_data(dataset_config: dict[str, Any], tokenizer, out_dir: Path) -> dict[str, Any]:
    """Tokenize once, drop over-long rows, split, save both splits; return a summary."""
    from datasets import Dataset

    records = load_records(dataset_config)
    template, max_length = dataset_config["template"], dataset_config["max_length"]
    tokenized = [tokenize_record(r, template, tokenizer) for r in records]
    kept = [row for row in tokenized if len(row["input_ids"]) <= max_length]
    dropped = len(tokenized) - len(kept)
    if not kept:
        shortest = min(len(row["input_ids"]) for row in tokenized)
        raise DataError(
            f"dataset.max_length {max_length}: all {len(tokenized)} rows are longer; raise it "
            f"(the shortest row has {shortest} tokens)"
        )
    if dropped:
        log.warning("dropped %d of %d rows longer than %d tokens", dropped, len(tokenized), max_length)
    if not any(len(r["input_ids"]) > r["prompt_length"] for r in kept):
        raise DataError("dataset.source: no row has a response to train on")
    train, validation = split_records(
        kept,
        dataset_config["validation_size"],
        dataset_config["max_train_examples"],
        dataset_config["seed"],
    )
    for name, rows in (("train", train), ("validation", validation)):
        Dataset.from_list(rows).save_to_disk(str(out_dir / name))
    lengths = sorted(len(r["input_ids"]) for r in kept)
    return {
        "source": dataset_config["source"],
        "template": template,
        "rows_read": len(records),
        "rows_dropped_too_long": dropped,
        "train_examples": len(train),
        "validation_examples": len(validation),
        "max_length": max_length,
        "median_tokens": lengths[len(lengths) // 2],
        "max_tokens": lengths[-1],
        "has_exact_answers": all(r["family"] for r in kept),
    }


def load_split(splits_dir: str | Path, name: str):
    from datasets import load_from_disk

    return load_from_disk(str(Path(splits_dir) / name))


def first_rows(split, count: int | None, run_id: str):
    """A run's training rows: the first `count` of the prepared split (training.train_examples; the split is
    shuffled once, so a smaller set is a subset of a larger one), or all of them."""
    if count is None:
        return split
    if count > len(split):
        from lora_study.core.errors import UserError

        raise UserError(f"run '{run_id}': training.train_examples {count}, but the prepared training split has "
                        f"{len(split)} rows: raise dataset.max_train_examples, or give more data")  # fmt: skip
    return split.select(range(count))
