"""The response-only next-token loss, with the output head computed only where a loss is taken.

The shortcut (hidden states at loss positions -> output head) equals the
model's own logits only when the model does nothing after its head. Families
that scale or cap logits (Granite's logits_scaling, Gemma 2's soft-capping,
Cohere's logit_scale) would silently train on a wrong loss, so the shortcut is
checked once per run against the model's own logits and dropped when they differ.

Rows that open alike (a chat template's system turn) share their prefix's forward pass, packed into one
sequence after it without padding (lora_study.training.inference.pack_after_prefix): in evaluation always (no
gradients, no dropout), in training where nothing draws a row its own randomness (no dropout) and without
gradient checkpointing. The gradient through the shared prefix is the sum of the rows' gradients through their
copies, so the step is the same function; it is checked once per run against full rows.
"""

from __future__ import annotations

import contextlib
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
    pack_after_prefix,
    plain_kv_cache,
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

    # Off: training computes every row in full even where sharing is exact (a benchmark's reference side).
    shares_prefix_in_training = True

    def __init__(self, model, path: str | None = None) -> None:
        self.model = model
        # SHORTCUT or FULL_LOGITS; None: decided (checked) on the first batch. A run's evaluation takes the
        # path its training checked: the same model, so the same answer, without a second full-logits pass.
        self.path = path
        # Rows that open alike share their prefix's forward pass (see the module's docstring).
        self.prefix_check = SharedPrefixCheck("response loss", model)
        self._training_reason: str | None = None  # why training computes every row in full; decided once

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

    def _full_logits_and_hidden(self, batch, keep) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's logits, and the hidden states its body gave its head in that same pass (what the
        shortcut computes its logits from: one forward for both sides of the output-head check)."""
        body = causal_lm(self.model).base_model
        captured: list[torch.Tensor | None] = []
        handle = body.register_forward_hook(
            lambda module, args, output: captured.append(getattr(output, "last_hidden_state", None))
        )
        try:
            logits = self._full_logits(batch, keep)
        finally:
            handle.remove()
        return logits, captured[0] if len(captured) == 1 else None

    def _shortcut_logits(self, batch, keep) -> torch.Tensor:
        return self._shortcut_logits_and_cache(batch, keep)[0]

    def _shortcut_logits_and_cache(self, batch, keep, **cache_flag) -> tuple[torch.Tensor, object]:
        body = causal_lm(self.model).base_model
        output = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **cache_flag)
        return self._head_at_loss_positions(output.last_hidden_state, keep), output.cache

    def _head_at_loss_positions(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The output head on the hidden states that predict a scored token (the shortcut's logits)."""
        return causal_lm(self.model).get_output_embeddings()(hidden[:, :-1][keep])

    def _shareable_prefix(self, batch, keep: torch.Tensor) -> int:
        """Leading tokens every row of `batch` shares before its first loss position (0: none worth sharing,
        or a training step whose rows compute their prefix differently)."""
        if self.prefix_check.usable is False or (self.model.training and self._training_computes_full_rows()):
            return 0
        ids = batch["input_ids"]
        first_loss = torch.where(keep.any(dim=1), keep.int().argmax(dim=1), ids.shape[1] - 1)
        limit = int(first_loss.min())
        return common_prefix_length(ids[:, :limit].tolist(), limit)

    def _shared_prefix_logits(self, batch, keep, prefix: int) -> torch.Tensor | None:
        """The shortcut's logits with the batch packed into one sequence: the shared prefix once, then each row's
        rest without its padding, attending to the prefix and to itself (None: no such mask for the model's
        attention, rows not right-padded, or rows too long for packing to pay)."""
        lm = causal_lm(self.model)
        config = lm.config
        packed = pack_after_prefix(batch["input_ids"], batch["attention_mask"], prefix, config._attn_implementation,
                                   config.get_text_config().hidden_size)  # fmt: skip
        if packed is None:
            return None
        ids, mask, positions, starts = packed
        hidden = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[0]
        rows, columns = keep.nonzero(as_tuple=True)  # row-major: the order of labels[keep]
        return lm.get_output_embeddings()(hidden[starts[rows] + columns - prefix])

    def _training_computes_full_rows(self) -> bool:
        """Whether training must compute each row in full (logged once, with the reason)."""
        if self._training_reason is None:
            self._training_reason = rows_differ_in_training(self.model) or ""
            if self._training_reason:
                log.info("response loss: each row computed in full in training (%s)", self._training_reason)
        return bool(self._training_reason) or not self.shares_prefix_in_training

    def _check_shared_prefix(self, batch, keep: torch.Tensor, prefix: int) -> None:
        """Shared against full computation on two rows of the first batch: the fewest and most loss positions.
        In training, without gradients in the run's own mode (no dropout to fork the RNG for; see _choose_path)."""
        started = time.perf_counter()
        counts = keep.sum(dim=1)
        rows = sorted({int(counts.argmin()), int(counts.argmax())})
        if len(rows) == 1:  # all rows alike: the first and the last (a shareable batch has two at least)
            rows = [0, keep.shape[0] - 1]
        pair = {name: value[rows] for name, value in batch.items()}
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            # Layers that keep state beyond keys and values (sliding windows, recurrent layers) would carry it
            # from one packed row into the next: such a model's cache says so.
            reference, cache = self._shortcut_logits_and_cache(pair, keep[rows], use_cache=True)
            plain = plain_kv_cache(cache)
            lm = causal_lm(self.model)
            why_not = (f"packing needs sdpa or eager attention (here {lm.config._attn_implementation}), "
                       "right-padded rows and rows short enough for it to pay") if plain else None  # fmt: skip
            try:
                shared = self._shared_prefix_logits(pair, keep[rows], prefix) if plain else None
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # a forward that takes no custom mask or position ids: full rows
                shared, why_not = None, f"the packed forward failed: {type(error).__name__}: {str(error)[:200]}"
        self.prefix_check.what = "training loss" if self.model.training else "response loss"
        self.prefix_check.decide(reference, shared, *([why_not] if why_not else []))
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
            full_logits, hidden = self._full_logits_and_hidden(batch, keep)
            if hidden is None:  # the model's forward did not run its body once: the shortcut's own pass
                torch.manual_seed(0)
                short = self._shortcut_logits(batch, keep).float()
            else:
                short = self._head_at_loss_positions(hidden, keep).float()
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


# Config attributes holding an attention-probability dropout (applied inside the attention kernel, no module).
ATTENTION_DROPOUT = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


def rows_differ_in_training(model) -> str | None:
    """Why the rows of a training batch cannot share their prefix's forward pass, or None."""
    lm = causal_lm(model)
    modules = list(model.modules())
    # Checkpointed training keeps no cache, which the check of packing reads; transformers marks each
    # checkpointed layer (its own property for this has changed names).
    if any(getattr(m, "gradient_checkpointing", False) is True for m in modules):
        return "gradient checkpointing is on"
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in modules):
        return "dropout draws each row its own mask"
    if any(float(getattr(lm.config, name, 0) or 0) > 0 for name in ATTENTION_DROPOUT):
        return "attention dropout draws each row its own mask"
    return None
