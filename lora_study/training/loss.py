"""The response-only next-token loss, with the output head computed only where a loss is taken.

The shortcut (hidden states at loss positions -> output head) equals the
model's own logits only when the model does nothing after its head. Families
that scale or cap logits (Granite's logits_scaling, Gemma 2's soft-capping,
Cohere's logit_scale) would silently train on a wrong loss, so the shortcut is
checked once per run against the model's own logits and dropped when they differ.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from lora_study.core import phases
from lora_study.training.batching import IGNORE_INDEX
from lora_study.training.inference import (
    CHECK_TOLERANCE,
    SharedPrefixCheck,
    common_prefix_length,
    prefix_cache,
    relative_difference,
)

log = logging.getLogger("lora_study")

# Config attributes of families known to post-process logits (soft-capping is invisible
# at initialisation, where logits are small, so it is not left to the numerical check).
LOGIT_POST_PROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
SHORTCUT = "head_at_loss_positions"
FULL_LOGITS = "full_logits"


def scored_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a next-token loss (response tokens after the first position)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def causal_lm(model):
    """The transformers CausalLM inside a PEFT wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ResponseLoss:
    """Summed next-token cross-entropy (fp32) over response tokens, and their count."""

    def __init__(self, model, path: str | None = None) -> None:
        self.model = model
        # SHORTCUT or FULL_LOGITS; None: decided (checked) on the first batch. A run's evaluation takes the
        # path its training checked: the same model, so the same answer, without a second full-logits pass.
        self.path = path
        # Without gradients (evaluation), rows that open alike share their prefix's forward pass.
        self.prefix_check = SharedPrefixCheck("response loss", model)

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        selected = self._selected_logits(batch, keep)
        return F.cross_entropy(selected.float(), labels[keep], reduction="sum"), scored_tokens(batch)

    def per_row(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's summed NLL (float64) and its number of scored tokens (paired comparisons need rows)."""
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        token_nll = F.cross_entropy(self._selected_logits(batch, keep).float(), labels[keep], reduction="none")
        rows = keep.nonzero()[:, 0]
        sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
        return sums.index_add_(0, rows, token_nll.double()), keep.sum(dim=1)

    def _selected_logits(self, batch, keep) -> torch.Tensor:
        if self.path is None:
            started = time.perf_counter()
            self.path = self._choose_path(batch, keep)
            phases.carve("checks", time.perf_counter() - started)
        if self.path == FULL_LOGITS:
            return self._full_logits(batch, keep)
        prefix = self._shareable_prefix(batch, keep)
        if prefix and self.prefix_check.usable is None:
            self._check_shared_prefix(batch, keep, prefix)
        shared = self._shared_prefix_logits(batch, keep, prefix) if prefix and self.prefix_check.usable else None
        return self._shortcut_logits(batch, keep) if shared is None else shared

    def _full_logits(self, batch, keep) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, :-1][keep]

    def _shortcut_logits(self, batch, keep) -> torch.Tensor:
        lm = causal_lm(self.model)
        hidden = lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return lm.get_output_embeddings()(hidden[:, :-1][keep])

    def _shareable_prefix(self, batch, keep: torch.Tensor) -> int:
        """Leading tokens every row of `batch` shares before its first loss position (0: none worth sharing);
        only in evaluation: with gradients or dropout each row's prefix computes differently."""
        if torch.is_grad_enabled() or self.model.training or self.prefix_check.usable is False:
            return 0
        ids = batch["input_ids"]
        first_loss = torch.where(keep.any(dim=1), keep.int().argmax(dim=1), ids.shape[1] - 1)
        limit = int(first_loss.min())
        return common_prefix_length(ids[:, :limit].tolist(), limit)

    def _shared_prefix_logits(self, batch, keep, prefix: int) -> torch.Tensor | None:
        """The shortcut's logits with the prefix run once for all rows (None: the cache cannot be shared)."""
        lm = causal_lm(self.model)
        ids = batch["input_ids"]
        cache = prefix_cache(lm.base_model, ids[:1, :prefix], ids.shape[0])
        if cache is None:
            return None
        rest = ids[:, prefix:]
        hidden = lm.base_model(input_ids=rest, attention_mask=batch["attention_mask"], cache=cache).last_hidden_state
        return lm.get_output_embeddings()(hidden[:, :-1][keep[:, prefix:]])

    def _check_shared_prefix(self, batch, keep: torch.Tensor, prefix: int) -> None:
        """Shared against full computation on two rows of the first batch: the fewest and most loss positions."""
        started = time.perf_counter()
        counts = keep.sum(dim=1)
        rows = sorted({int(counts.argmin()), int(counts.argmax())})
        if len(rows) == 1:  # all rows alike: the first and the last (a shareable batch has two at least)
            rows = [0, keep.shape[0] - 1]
        pair = {name: value[rows] for name, value in batch.items()}
        reference = self._shortcut_logits(pair, keep[rows])
        self.prefix_check.decide(reference, self._shared_prefix_logits(pair, keep[rows], prefix))
        phases.carve("checks", time.perf_counter() - started)

    def _choose_path(self, batch, keep: torch.Tensor) -> str:
        config = causal_lm(self.model).config
        known = [name for name in LOGIT_POST_PROCESSING if getattr(config, name, None) not in (None, 1, 1.0)]
        if known:
            log.info("loss: full logits (the model post-processes them: %s)", ", ".join(known))
            return FULL_LOGITS
        # One row is enough to see post-processing (its cost is a fraction of the batch's): the one
        # with the most loss positions.
        row = int(keep.sum(dim=1).argmax())
        batch, keep = {name: value[row : row + 1] for name, value in batch.items()}, keep[row : row + 1]
        # Same mode as the run (switching to eval would let bitsandbytes repack 4-bit weights for
        # CPU inference, a format without a backward pass) and the same dropout masks for both
        # paths: each starts from one seed, in a forked RNG the run's own stream never sees.
        device = batch["input_ids"].device
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            full_logits = self._full_logits(batch, keep)
            torch.manual_seed(0)
            short = self._shortcut_logits(batch, keep).float()
        difference = relative_difference(full_logits, short)
        device_type = full_logits.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else full_logits.dtype
        tolerance = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE[torch.float32])
        if difference > tolerance:
            log.warning(
                "loss: the output head alone does not reproduce the model's logits (relative difference %.3g); "
                "computing full logits for this run",
                difference,
            )
            return FULL_LOGITS
        log.info("loss: output head at loss positions only (checked against full logits: %.2g)", difference)
        return SHORTCUT
