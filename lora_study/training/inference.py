"""Forward passes without repeated work: a prompt prefix every row of a batch shares is run once, and on CPU a
4-bit model's weights are dequantized once for greedy generation instead of at every step.

Shared prefix: the rows of a chat-formatted data set open with the same system turn (24 of the default data's
53 tokens per row). Without dropout every row's keys and values over that prefix are the same, so the prefix
runs once per batch: for the loss (training and perplexity) the batch is packed into one sequence, the prefix
then each row's rest without its padding, each rest attending to the prefix and to itself at its own positions
(`pack_after_prefix`); greedy generation continues every row from the prefix's key/value cache
(`prefix_cache`). That is the same function; only rounding differs (other matrix shapes). It is checked once
per use against the full computation on two rows and used only where the model's cache is the plain per-layer
key/value cache (sliding-window and recurrent layers keep state that packing would carry from row to row).

Dequantized once: bitsandbytes on CPU dequantizes a 4-bit weight at every call, then multiplies; a decoding
step of a few tokens is mostly that dequantization. `dequantized_once` does the same two operations, the first
once per layer: the same numbers bit for bit (tested against bitsandbytes' own forward), with each layer's
dequantized copy held while it is in force (CPU memory, the model's unquantized size in the compute dtype).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger("lora_study")

# Shorter common prefixes are not worth a second forward call.
MIN_SHARED_PREFIX = 8
# Largest relative difference between two computations' logits that is rounding, per compute dtype (the
# shared-prefix checks here and the output-head check in lora_study.training.loss).
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def common_prefix_length(sequences: Sequence[Sequence[int]], limit: int) -> int:
    """Tokens all `sequences` open with, at most `limit`; 0 when below MIN_SHARED_PREFIX or for one sequence."""
    if len(sequences) < 2:
        return 0
    first, longest = sequences[0], min(limit, *(len(s) for s in sequences))
    length = 0
    while length < longest and all(s[length] == first[length] for s in sequences):
        length += 1
    return length if length >= MIN_SHARED_PREFIX else 0


def plain_kv_cache(cache) -> bool:
    """Whether `cache` is transformers' dynamic cache of full-attention key/value layers only."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def prefix_cache(body, prefix_ids: torch.Tensor, rows: int):
    """The key/value cache of `prefix_ids` (one row) repeated for `rows` rows; None where the cache is not plain."""
    cache = body(input_ids=prefix_ids, use_cache=True).cache
    if not plain_kv_cache(cache):
        return None
    cache.batch_repeat_interleave(rows)
    return cache


# Longest packed sequence: its attention mask holds this many squared booleans.
MAX_PACKED_TOKENS = 8192


def packing_pays(rows: int, width: int, packed: int, hidden_size: int) -> bool:
    """Whether one packed sequence of `packed` tokens costs less than `rows` padded rows of `width`. Packing
    saves the linear layers' work on padding and on the prefix's copies (about 2 x 12 hidden^2 FLOPs per token
    and layer) but attends over the whole sequence (4 x hidden FLOPs per query-key pair and layer, masked or
    not): short rows gain, long ones would lose."""
    saved_linear = 24 * hidden_size * (rows * width - packed)
    extra_attention = 4 * (packed * packed - rows * width * width)
    return packed <= MAX_PACKED_TOKENS and extra_attention < saved_linear


def pack_after_prefix(ids: torch.Tensor, mask: torch.Tensor, prefix: int, attention: str, hidden_size: int):
    """A right-padded batch whose rows open with the same `prefix` tokens as one sequence: the prefix once, then
    each row's remaining tokens. Returns (ids, 4-D mask, position ids, where each row's rest starts), or None
    where rows are not right-padded, the attention takes no custom mask or packing would cost more
    (`packing_pays`). Each rest attends causally to the prefix and to itself, at the positions it has in its own
    row: the rows' function, without padding and without computing the prefix once per row."""
    lengths = mask.sum(dim=1)
    if attention not in ("sdpa", "eager") or not bool((mask[:, 1:] <= mask[:, :-1]).all() and mask[:, 0].all()):
        return None
    device, rests = ids.device, (lengths - prefix).tolist()
    if not packing_pays(len(rests), ids.shape[1], prefix + sum(rests), hidden_size):
        return None
    tokens = torch.cat([ids[0, :prefix], *(ids[row, prefix : prefix + rest] for row, rest in enumerate(rests))])
    positions = torch.cat([torch.arange(prefix, device=device),
                           *(torch.arange(prefix, prefix + rest, device=device) for rest in rests)])  # fmt: skip
    # Segment 0 is the prefix, row r's rest is segment r + 1.
    segment = torch.repeat_interleave(torch.arange(len(rests) + 1, device=device),
                                      torch.tensor([prefix, *rests], device=device))  # fmt: skip
    index = torch.arange(len(tokens), device=device)
    allowed = (index[:, None] >= index[None, :]) & ((segment[:, None] == segment[None, :]) | (segment[None, :] == 0))
    if attention == "eager":  # eager attention adds its mask to the scores
        allowed = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    starts = prefix + torch.cumsum(torch.tensor([0, *rests[:-1]], device=device), dim=0)
    return tokens[None], allowed[None, None], positions[None], starts


def relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.float(), other.float()
    return float((reference - other).abs().max() / reference.abs().max().clamp_min(1e-6))


def batch_dependent_layers(model: torch.nn.Module) -> str | None:
    """Why a row's numbers depend on the other rows of its batch in `model`, or None.

    bitsandbytes' int8 layers (LLM.int8) compute the input columns where any row of the batch exceeds the outlier
    threshold in 16 bits and the rest in int8: another batch, another split. Measured on the default study: the
    prefix run alone moved int8 logits by 5 %, and generating 64 prompts at once instead of 16 changed 31 of an
    int8 base model's 64 greedy answers.
    """
    layers = sys.modules.get("bitsandbytes.nn")  # not imported: the model holds none of its layers
    if layers is None:
        return None
    if any(isinstance(layer, layers.Linear8bitLt) and layer.state.threshold > 0 for layer in model.modules()):
        return "int8 layers split each batch's columns by its outliers"
    return None


class SharedPrefixCheck:
    """Whether shared-prefix computation reproduces the full computation for one model: decided on first use,
    or at once where the model's arithmetic depends on the batch."""

    def __init__(self, what: str, model: torch.nn.Module) -> None:
        self.what = what
        self.usable: bool | None = None
        if reason := batch_dependent_layers(model):
            self.usable = False
            log.info("%s: each row computed in full (%s)", what, reason)

    def take(self, checked: SharedPrefixCheck) -> None:
        """Take the decision `checked` made on the same model (training's, for its own evaluation), if any."""
        if self.usable is None and checked.usable is not None:
            self.usable = checked.usable
            log.info("%s: %s, as %s checked", self.what,
                     "shared prompt prefix computed once per batch" if self.usable else "each row computed in full",
                     checked.what)  # fmt: skip

    def decide(self, reference: torch.Tensor, shared: torch.Tensor | None,
               why_not: str = "the model's cache is not a plain key/value cache") -> bool:  # fmt: skip
        """Compare `shared` (None: it could not be computed, `why_not`) with `reference`; logs the outcome once."""
        if shared is None:
            self.usable = False
            log.info("%s: each row computed in full (%s)", self.what, why_not)
            return False
        difference = relative_difference(reference, shared)
        tolerance = CHECK_TOLERANCE.get(reference.dtype, CHECK_TOLERANCE[torch.float32])
        self.usable = difference <= tolerance
        if self.usable:
            log.info("%s: shared prompt prefix computed once per batch (checked against full rows: %.2g)",
                     self.what, difference)  # fmt: skip
        else:
            log.warning("%s: a shared prefix does not reproduce full rows (relative difference %.3g > %.g): "
                        "each row computed in full", self.what, difference, tolerance)  # fmt: skip
        return self.usable


def _dequantizing_forward(layer, weights: dict[torch.dtype, torch.Tensor], absmax: torch.Tensor):
    """bitsandbytes' Linear4bit.forward on CPU (no packed format): cast the input to the compute dtype,
    dequantize the weight to it, linear, cast back; the dequantized weight kept per dtype."""
    state = layer.weight.quant_state

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not layer.compute_type_is_set:
            layer.set_compute_type(x)
            layer.compute_type_is_set = True
        input_dtype = x.dtype
        if layer.compute_dtype is not None:
            x = x.to(layer.compute_dtype)
        bias = layer.bias
        if bias is not None:
            if bias.dtype != x.dtype:
                bias.data = bias.data.to(x.dtype)
            bias = bias.to(layer.compute_dtype)
        weight = weights.get(x.dtype)
        if weight is None:
            weight = weights[x.dtype] = torch.ops.bitsandbytes.dequantize_4bit.default(
                layer.weight.data.view(-1, 1), absmax, state.blocksize, state.quant_type, state.shape, x.dtype
            )
        return F.linear(x, weight, bias).to(input_dtype)

    return forward


def _absmax(state) -> torch.Tensor | None:
    """The per-block scales bitsandbytes' gemm_4bit computes with (nested ones dequantized as it does)."""
    if not state.nested:
        return state.absmax
    if state.state2.blocksize != 256:  # bitsandbytes itself refuses these
        return None
    scales = torch.ops.bitsandbytes.dequantize_blockwise.default(
        state.absmax, state.state2.absmax, state.state2.code, 256, torch.float32
    )
    return scales + state.offset


@contextlib.contextmanager
def dequantized_once(model: torch.nn.Module) -> Iterator[int]:
    """On CPU, every bitsandbytes 4-bit layer of `model` dequantizes its weight once while in force (yields how
    many layers); elsewhere, and for layers in bitsandbytes' packed CPU format, nothing changes."""
    from bitsandbytes.nn import Linear4bit

    patched = []
    for layer in model.modules():
        if not isinstance(layer, Linear4bit) or layer.weight.device.type != "cpu":
            continue
        state = layer.weight.quant_state
        if state is None or getattr(state, "packing_format_for_cpu", False) or layer.support_avx512bf16_for_cpu:
            continue
        absmax = _absmax(state)
        if absmax is None:
            continue
        layer.forward = _dequantizing_forward(layer, {}, absmax)
        patched.append(layer)
    try:
        yield len(patched)
    finally:
        for layer in patched:
            del layer.forward  # back to the class's forward; the dequantized copies go with the closures
