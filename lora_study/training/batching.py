"""Shuffled (optionally length-grouped) batches with dynamic padding and response-only labels."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lora_study.study.settings import TrainingSettings

IGNORE_INDEX = -100
# With grouping, sort within windows of this many batches: similar lengths, still shuffled.
GROUP_WINDOW_BATCHES = 32


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True
) -> list[list[int]]:
    """One epoch of index batches, shuffled; grouped by length when asked.

    Grouping sorts rows by length within windows of GROUP_WINDOW_BATCHES
    batches, so padding only reaches the longest row of a batch. It saves
    compute, but batches of similar length can also be batches of similar
    content (here: one task family), which slows learning in short runs; it is
    therefore off by default (training.group_by_length).
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * (GROUP_WINDOW_BATCHES if group_by_length else 1)
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def endless_batches(lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool) -> Iterator[list[int]]:
    """Epoch after epoch, each with its own shuffle (seed + epoch)."""
    epoch = 0
    while True:
        yield from length_grouped_batches(lengths, batch_size, seed + epoch, group_by_length)
        epoch += 1


def total_steps(training: TrainingSettings, examples: int) -> int:
    """Optimizer steps of a run: max_steps if set, else enough for `epochs` passes over `examples`."""
    if training.max_steps:
        return int(training.max_steps)
    if not training.epochs:
        raise ValueError("training: set max_steps or epochs")
    batches_per_epoch = math.ceil(examples / training.batch_size)
    return max(1, math.ceil(training.epochs * batches_per_epoch / training.gradient_accumulation_steps))


def collate(rows: Sequence[dict[str, Any]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the batch's longest row; labels only on response tokens."""
    longest = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.tensor(row["input_ids"], dtype=torch.long)
        span = slice(0, len(ids)) if padding_side == "right" else slice(longest - len(ids), longest)
        input_ids[i, span] = ids
        attention[i, span] = 1
        row_labels = ids.clone()
        row_labels[: row["prompt_length"]] = IGNORE_INDEX
        labels[i, span] = row_labels
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
