"""Predict each run's peak training memory before anything is trained.

The prediction is a sum of terms, each reported on its own:

- base weights by quantization: 4-bit packs two weights per byte plus one
  absmax constant per block of 64 (fp32, or 8-bit with a second fp32 level
  per 256 blocks under double quantization); int8 holds one byte per weight
  plus an fp32 scale per output row. Under the precision recipe
  (lora_study.training.precision) embeddings and output head are in the compute
  dtype and norms in fp32; unquantized runs hold their weights in the
  resolved weight dtype.
- LoRA states: fp32 weights, gradients and AdamW's two moments (16 bytes per
  trainable parameter; 10 with 8-bit AdamW), counted on PEFT's own layers for
  the run's method (DoRA adds a magnitude vector per adapted layer, and its
  forward saves the combined weight and its norm: the meta pass counts them).
- full fine-tuning: fp32 master weights, their gradients and AdamW states
  for every parameter, plus the compute-dtype copies autocast makes of the
  weights for the forward pass (kept for the backward pass).
- activations: the tensors autograd saves for the backward pass, counted
  from a forward pass of the real architecture on PyTorch's meta device
  (shapes and dtypes only: no weights, no arithmetic), with the run's
  targets, rank, dropout and gradient checkpointing, held as the precision
  recipe holds it (norms and LoRA in fp32; 4-bit layers compute in the
  compute dtype and return their input's, so behind an fp32 norm their
  outputs are fp32) and with autocast emulated (matmuls and attention cast
  their inputs to the compute dtype). The meta device
  takes SDPA's reference path, which saves the batch x heads x T x T
  attention matrix; the fused kernels used on real devices keep a log-sum-exp
  per query instead, so those matrices are replaced by that.
- backward working set: one layer's activations (gradients of the layer being
  differentiated; with gradient checkpointing also its recomputed
  activations).
- output head: the logits at loss positions (batch x longest response),
  their fp32 log-softmax and its gradient.
- a sharded run (training.gpus = N > 1), per rank: weights, LoRA (or full
  fine-tuning's) states divided by N, plus the weights FSDP gathers whole: the
  root's (embeddings, norms, head: gathered for the whole step) and two
  decoder layers (the one computing and the one prefetched); activations,
  backward working set and logits for the rank's share of the batch, with
  full logits (a sharded run computes no output-head shortcut); the CPU
  overhead once per process.
- overhead: on CUDA the context (outside torch's allocator, inside NVML's
  figure) and allocator slack. On CPU the interpreter and libraries; the
  checkpoint files where the recipe loads weights in the checkpoint's own
  dtype (those tensors stay views of the memory-mapped files, so the mapping,
  every page of it read while loading, stays resident: the weights held that
  way are counted there, not twice); and glibc's retention: freed activation
  memory of one step stays resident for the next (CPU_ALLOCATOR_RETENTION of
  the activations, backward working set and logits).

Nothing here loads weights: a plan for a 2.7B model takes seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lora_study.core.formats import FOUR_BIT
from lora_study.study.budget import AUTO, GPU_COUNTS, auto_gpus, per_gpu_column
from lora_study.study.methods import DORA, FULL, LORA
from lora_study.study.modules import Targets, resolve_attention, targets_as_given
from lora_study.study.preflight import check_with_manifest
from lora_study.study.settings import TrainingSettings
from lora_study.study.sweep import RunSpec, sharding_problem
from lora_study.training.batching import total_steps
from lora_study.training.precision import (
    DTYPES,
    DeviceCapability,
    Recipe,
    apply_recipe,
    detect_capability,
    is_norm,
    recipe_for,
)

log = logging.getLogger("lora_study")

GB = 1024**3
NF4_BLOCK = 64  # weights per 4-bit absmax constant (bitsandbytes default)
DOUBLE_QUANT_BLOCK = 256  # absmax constants per second-level constant
# Per trainable parameter: fp32 weight and gradient, plus the optimizer's two moments.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}
CUDA_CONTEXT_GB = 0.5  # CUDA context + kernels; NVML counts it, torch's allocator does not
CUDA_ALLOCATOR_SLACK = 0.10  # reserved over allocated at peak (fragmentation, rounding)
CPU_RUNTIME_GB = 0.55  # RSS of python + torch + transformers + peft + datasets at training start, measured here
# glibc keeps freed memory resident: beyond the counted terms, the training phase's resident peak held another
# 32-79 % of the activations, backward working set and logits (bench/planner_cpu.py, 5 runs x 2 CPU classes);
# the middle of that range, the same for every recipe and CPU.
CPU_ALLOCATOR_RETENTION = 0.5
SAFETENSORS_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
PLAN_DEVICES = ("cuda", "cpu")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# The GPU a CUDA plan assumes when it resolves `auto`: one with native bf16 (Ampere or newer).
PLANNED_GPU = DeviceCapability(device_type="cuda", name="planned GPU (native bf16)", cuda_native_bf16=True)


@dataclass(frozen=True)
class ModelFacts:
    """Parameter counts of an architecture, from its config alone."""

    linear_layers: dict[str, tuple[int, int]]  # (in, out) of each layer bitsandbytes replaces, by name
    other_params: int  # embeddings, norms, biases, output head
    vocab_size: int
    norm_params: int = 0  # part of other_params: kept in fp32 by the recipe

    @property
    def total_params(self) -> int:
        return sum(self.quantizable_sizes) + self.other_params

    @property
    def quantizable_sizes(self) -> list[int]:
        return [fan_in * fan_out for fan_in, fan_out in self.linear_layers.values()]

    @property
    def quantizable_rows(self) -> int:
        """Output features of the quantized layers (int8 keeps one scale per row)."""
        return sum(fan_out for _, fan_out in self.linear_layers.values())


def meta_causal_lm(model_config, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype, attn_implementation=attn_implementation)


def meta_attention(resolved: str) -> str:
    """The implementation a meta-device pass can take for `resolved`: fused kernels count as SDPA."""
    return "eager" if resolved == "eager" else "sdpa"


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear layer: nn.Linear, or GPT-2's Conv1D (weight stored in x out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return None


def _body_linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Linear layers bitsandbytes quantizes and LoRA can target: all but the output head."""
    head = model.get_output_embeddings()
    layers = {}
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None and module is not head:
            layers[name] = shape
    return layers


def model_facts(model_config) -> ModelFacts:
    model = meta_causal_lm(model_config, torch.float32, "eager")  # every model has eager attention
    linear = _body_linear_layers(model)
    quantizable = sum(fan_in * fan_out for fan_in, fan_out in linear.values())
    total = sum(p.numel() for p in model.parameters())
    norms = sum(p.numel() for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False))
    return ModelFacts(linear, total - quantizable, model_config.get_text_config().vocab_size, norms)


def weights_bytes(facts: ModelFacts, recipe: Recipe, double_quant: bool) -> float:
    """Frozen base weights as held during training under the recipe."""
    n = sum(facts.quantizable_sizes)
    if recipe.quantization in FOUR_BIT:
        quantized = sum(_four_bit_bytes(size, double_quant) for size in facts.quantizable_sizes)
    elif recipe.quantization == "int8":
        quantized = n + facts.quantizable_rows * 4
    else:
        quantized = n * DTYPE_BYTES[recipe.weight_format]
    return quantized + _other_bytes(facts, recipe)


def _other_bytes(facts: ModelFacts, recipe: Recipe) -> float:
    """The weights bitsandbytes leaves alone: embeddings, head and biases in the compute dtype, norms in fp32."""
    return (facts.other_params - facts.norm_params) * DTYPE_BYTES[recipe.compute_dtype] + facts.norm_params * 4


def _four_bit_bytes(size: int, double_quant: bool) -> float:
    """One 4-bit layer: packed weights, then its absmax constants (per block of 64)."""
    blocks = math.ceil(size / NF4_BLOCK)
    if not double_quant:
        return math.ceil(size / 2) + blocks * 4
    # 8-bit absmax, one fp32 constant per 256 blocks, and the layer's 256-entry fp32 code table.
    return math.ceil(size / 2) + blocks + math.ceil(blocks / DOUBLE_QUANT_BLOCK) * 4 + 256 * 4


_LORA_PARAMS_CACHE: dict[tuple[Any, ...], int] = {}


LayerRanks = tuple[tuple[str, int], ...]  # RunSpec.layer_ranks: a rank pattern's (module regex, rank) pairs


def _planning_flags(method: str, layer_ranks: LayerRanks = ()) -> dict[str, Any]:
    """The LoraConfig flags that change memory: DoRA's and a rank pattern. (rsLoRA and alphas scale;
    PiSSA/OLoRA only initialise.)"""
    flags: dict[str, Any] = {"use_dora": True} if method == DORA else {}
    if layer_ranks:
        flags["rank_pattern"] = dict(layer_ranks)
    return flags


def lora_params(model_config, targets: Targets, rank: int, method: str = LORA, layer_ranks: LayerRanks = ()) -> int:
    """Trainable parameters PEFT creates for `targets` at `rank`, counted on the meta device.

    Counting PEFT's own layers covers every case a formula would have to
    repeat: fused layers, regex scopes, 3-D expert weights.
    """
    key = _lora_params_key(model_config, targets, rank, method, layer_ranks)
    if key not in _LORA_PARAMS_CACHE:  # a plan counts them on its activation pass's model (_saved_tensors)
        from peft import LoraConfig, get_peft_model

        flags = _planning_flags(method, layer_ranks)
        model = meta_causal_lm(model_config, torch.float32, "eager")
        with targets_as_given():
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, **targets.lora_kwargs(), **flags))
        _LORA_PARAMS_CACHE[key] = trainable_count(model)
    return _LORA_PARAMS_CACHE[key]


def _lora_params_key(model_config, targets: Targets, rank: int, method: str, layer_ranks: LayerRanks
                     ) -> tuple[Any, ...]:  # fmt: skip
    return (model_config.to_json_string(), targets.key(), rank, method == DORA, layer_ranks)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


_ACTIVATION_CACHE: dict[tuple[Any, ...], tuple[float, float]] = {}


def saved_activation_bytes(
    model_config,
    targets: Targets,
    rank: int,
    dropout: float,
    dtype_name: str,
    gradient_checkpointing: bool,
    attn_implementation: str,
    batch_size: int,
    seq_len: int,
    method: str = LORA,
    recipe: Recipe | None = None,
    layer_ranks: LayerRanks = (),
) -> tuple[float, float]:
    """(bytes autograd saves in one forward pass, bytes one layer saves without checkpointing).

    Full fine-tuning (`method` full) trains every weight, no LoRA layers.
    With a `recipe`, the pass holds the model as training does: its tensors
    cast by the recipe (norms and LoRA fp32), 4-bit layers emulated (they
    compute in the compute dtype and return their input's dtype: fp32 behind
    an fp32 norm), and autocast emulated (matmuls and attention cast
    their inputs to the compute dtype; `dtype_name` is then the recipe's).
    Cached by the config's content and the arguments: runs that differ only in
    what does not change activations share one count.
    """
    key = (model_config.to_json_string(), targets.key(), rank, dropout, dtype_name, gradient_checkpointing,
           attn_implementation, batch_size, seq_len, method, recipe, layer_ranks)  # fmt: skip
    if key in _ACTIVATION_CACHE:
        return _ACTIVATION_CACHE[key]
    dtype = getattr(torch, dtype_name) if recipe is None else recipe.load_dtype
    shape = (batch_size, seq_len)
    fused_attention = attn_implementation != "eager"
    autocast_on = recipe is not None and recipe.autocast
    text = model_config.get_text_config()  # a multimodal checkpoint's language model
    try:
        tensors = _saved_tensors(model_config, targets, rank, dropout, dtype, recipe, gradient_checkpointing,
                                 attn_implementation, shape, method, autocast_on, layer_ranks)  # fmt: skip
        widen = None
    except RuntimeError as error:
        if "Expected inputs of BF16" not in str(error):
            raise
        # Experts computed by torch's grouped matmul: on the meta device it takes only bf16. Plan in bf16 (every
        # matmul cast to it, as autocast would) and count each bf16 tensor at the size it has in the run's dtype.
        tensors = _saved_tensors(model_config, targets, rank, dropout, torch.bfloat16, _in_bf16(recipe),
                                 gradient_checkpointing, attn_implementation, shape, method, True,
                                 layer_ranks)  # fmt: skip
        widen = dtype
    saved = sum(t.numel() * (widen.itemsize if widen is not None and t.dtype == torch.bfloat16 else t.element_size())
                for t in tensors)  # fmt: skip
    if fused_attention:  # the fused kernels' fp32 log-sum-exp per query and head
        saved += text.num_hidden_layers * batch_size * text.num_attention_heads * seq_len * 4
    if gradient_checkpointing:
        per_layer = saved_activation_bytes(model_config, targets, rank, dropout, dtype_name, False,
                                           attn_implementation, batch_size, seq_len, method, recipe,
                                           layer_ranks)[1]  # fmt: skip
    else:
        per_layer = saved / text.num_hidden_layers
    _ACTIVATION_CACHE[key] = (saved, per_layer)
    return saved, per_layer


def _saved_tensors(model_config, targets: Targets, rank: int, dropout: float, dtype: torch.dtype,
                   recipe: Recipe | None, gradient_checkpointing: bool, attn_implementation: str,
                   shape: tuple[int, int], method: str, autocast_on: bool,
                   layer_ranks: LayerRanks = ()) -> list[torch.Tensor]:  # fmt: skip
    """The distinct tensors autograd saves in one meta-device forward pass of a (batch, length) `shape` batch
    (weights and, with fused attention, T x T matrices left out)."""
    from peft import LoraConfig, get_peft_model

    batch_size, seq_len = shape
    model = meta_causal_lm(model_config, dtype, meta_attention(attn_implementation))
    # Weights are counted apart (frozen base, or full fine-tuning's masters and their autocast copies), by id:
    # the dict keeps each alive, so no later tensor can reuse its id.
    frozen: dict[int, torch.Tensor] = {}
    if recipe is not None and recipe.quantization in FOUR_BIT:
        for name in _body_linear_layers(model):
            layer = model.get_submodule(name)
            # A subclass with its own forward (an MoE router returning scores and indices) keeps it.
            if type(layer) is nn.Linear or type(layer).__name__ == "Conv1D":
                _emulate_four_bit(layer, recipe, frozen)
    model.requires_grad_(method == FULL)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != FULL:
            model.enable_input_require_grads()
    if method != FULL:
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, **targets.lora_kwargs(),
                          **_planning_flags(method, layer_ranks))  # fmt: skip
        with targets_as_given():
            model = get_peft_model(model, lora)
        # The same layers lora_params would create: counted here, a second meta model is not built for them.
        _LORA_PARAMS_CACHE.setdefault(_lora_params_key(model_config, targets, rank, method, layer_ranks),
                                      trainable_count(model))  # fmt: skip
    if recipe is not None:
        apply_recipe(model, recipe)
    model.train()
    frozen.update((id(p), p) for p in model.parameters() if not p.requires_grad or method == FULL)
    autocast = _MetaAutocast(recipe.torch_compute_dtype, frozen) if recipe is not None and autocast_on else None
    fused_attention = attn_implementation != "eager"
    seen: dict[int, torch.Tensor] = {}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        is_weight = id(base) in frozen or id(tensor) in frozen
        is_attention_matrix = tensor.dim() >= 2 and tensor.shape[-1] == tensor.shape[-2] == seq_len
        if not is_weight and not (fused_attention and is_attention_matrix):
            seen[id(base)] = base
        return tensor

    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    # A ready 4-D mask: transformers' mask builder inspects values, which meta tensors lack. Models that build
    # their attention bias from the 2-D padding mask (Bloom's ALiBi) take that one instead.
    masks = (torch.zeros(batch_size, 1, seq_len, seq_len, dtype=dtype, device="meta"),
             torch.ones(batch_size, seq_len, dtype=torch.long, device="meta"))  # fmt: skip
    positions = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    inner = model.get_base_model().base_model if method != FULL else model.base_model
    first_error: Exception | None = None
    for mask in masks:
        seen.clear()
        try:
            with (torch.autograd.graph.saved_tensors_hooks(count, lambda t: t), autocast or contextlib.nullcontext(),
                  _no_autocast_on_meta()):  # fmt: skip
                inner(input_ids=ids, attention_mask=mask, position_ids=positions)
            break
        except (ValueError, RuntimeError) as error:
            first_error = first_error or error
    else:
        assert first_error is not None
        raise first_error  # what the 4-D mask met: the 2-D one is only for models that cannot take it
    return list(seen.values())


@contextlib.contextmanager
def _no_autocast_on_meta() -> Iterator[None]:
    """torch.autocast refuses the meta device even to switch itself off, which PEFT does around the experts'
    LoRA fold: on the meta device, an autocast context is no context."""
    real = torch.autocast

    def autocast(device_type: str, *args: Any, **kwargs: Any):
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)

    torch.autocast = autocast  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.autocast = real  # type: ignore[misc]


def _in_bf16(recipe: Recipe | None) -> Recipe:
    """The recipe with bf16 in place of fp32 (for a meta pass that must run in bf16)."""
    if recipe is None:
        return Recipe("bf16", "bf16", "bf16")
    weights = "bf16" if recipe.weight_format == "fp32" else recipe.weight_format
    return dataclasses.replace(recipe, compute_dtype="bf16", weight_format=weights)


def _emulate_four_bit(layer: nn.Module, recipe: Recipe, weights: dict[int, torch.Tensor]) -> None:
    """Make a meta-device linear layer behave as a bitsandbytes 4-bit one: it casts its input to the compute
    dtype and returns its input's dtype (fp32 behind an fp32 norm, where an autocast linear returns the compute
    dtype), and with the weight frozen saves no activation of its own (weight copies made here join `weights`).
    int8 layers return what an autocast linear does (measured: the same saved tensors as 16-bit)."""

    transposed = type(layer).__name__ == "Conv1D"  # GPT-2 stores (in, out); bitsandbytes' layer holds (out, in)

    def forward(x: torch.Tensor) -> torch.Tensor:
        inner = x.to(recipe.torch_compute_dtype)
        weight = (layer.weight.t() if transposed else layer.weight).to(inner.dtype)
        weights[id(weight)] = weight
        bias = layer.bias.to(inner.dtype) if layer.bias is not None else None
        return torch.nn.functional.linear(inner, weight, bias).to(x.dtype)

    layer.forward = forward


class _MetaAutocast(TorchFunctionMode):
    """Autocast for the meta device (which torch.autocast does not take): the matmuls and attention cast their
    floating-point inputs to the compute dtype, as autocast does on CPU and CUDA. Casts of weights (ids in
    `weights`) are weights too: the planner counts those copies apart."""

    def __init__(self, dtype: torch.dtype, weights: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.dtype = dtype
        self.weights = weights
        functional = torch.nn.functional
        self.lowered = {functional.linear, functional.scaled_dot_product_attention, torch.matmul, torch.bmm,
                        torch.baddbmm, torch.addmm, torch.Tensor.matmul, torch.Tensor.__matmul__}  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.lowered:
            args = tuple(self._cast(a) for a in args)
            kwargs = {k: self._cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def _cast(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == self.dtype:
            return value
        cast = value.to(self.dtype)
        if id(value) in self.weights:
            self.weights[id(cast)] = cast
        return cast


@dataclass(frozen=True)
class Checkpoint:
    """The model's weight files: their size and the dtype their floating-point tensors are stored in."""

    bytes: int = 0
    dtype: str | None = None  # bf16, fp16, fp32; None when unknown (or mixed)

    def shared_by(self, recipe: Recipe) -> bool:
        """Whether weights loaded under `recipe` stay views of the mapped files (no conversion copies them)."""
        return self.dtype is not None and DTYPES[self.dtype] == recipe.load_dtype


def unquantized_bytes(facts: ModelFacts, recipe: Recipe, double_quant: bool) -> float:
    """The part of the base weights loaded as they are stored (not packed by bitsandbytes)."""
    return _other_bytes(facts, recipe) if recipe.quantized else weights_bytes(facts, recipe, double_quant)


def logits_bytes(positions: int, vocab_size: int, head_bytes: int) -> float:
    """Logits at loss positions, their fp32 copy, log-softmax and gradient."""
    return positions * vocab_size * (head_bytes + 4 + 4 + 4)


def planning_recipe(run: RunSpec, plan_device: str) -> Recipe:
    """The recipe a run will follow on the planned device (`auto` resolved for it)."""
    capability = PLANNED_GPU if plan_device == "cuda" else detect_capability(torch.device("cpu"))
    assert run.training is not None
    return recipe_for(run.quantization, run.training.compute_dtype, capability, full=run.is_full)


@dataclass
class RunPlan:
    run_id: str
    quantization: str
    compute_dtype: str
    rank: int
    modules: str
    trainable_params: int
    weights_gb: float
    lora_states_gb: float  # adapter_weights_gb + gradients_optimizer_gb
    activations_gb: float
    backward_working_gb: float
    logits_gb: float
    predicted_cuda_allocated_gb: float
    predicted_cuda_gb: float
    predicted_cpu_gb: float
    predicted_gb: float
    batch_rows: int
    batch_padded_length: int
    plan_device: str
    budget_gb: float | None
    skip: bool
    attn_implementation: str = ""
    plan_error: str = ""  # why there is no prediction (the planner failed on this run; it still trains)
    adapter_weights_gb: float = math.nan  # the trained LoRA weights (fp32); 0 for full fine-tuning
    gradients_optimizer_gb: float = math.nan  # their gradients and optimizer states (+ autocast copies)
    gpus: int = 1  # devices the run is sharded over: every term above is then one rank's
    gathered_gb: float = 0.0  # part of weights_gb: what FSDP holds whole besides the rank's shard
    # The predicted peak per device were the run sharded over each of GPU_COUNTS (plan.csv's
    # predicted_<device>_gb_<N>gpu columns; NaN where it cannot be): "GPUs needed" and `gpus: auto` read them.
    per_gpu_gb: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.update(values.pop("per_gpu_gb"))
        return values

    @classmethod
    def unplanned(cls, run: RunSpec, plan_device: str, budget_gb: float | None, error: Exception) -> RunPlan:
        """A run the planner failed on: every prediction missing, never skipped for the budget."""
        missing = math.nan
        return cls(
            run_id=run.run_id, quantization=run.quantization, compute_dtype="", rank=run.rank,
            modules=",".join(run.modules), trainable_params=0, weights_gb=missing, lora_states_gb=missing,
            activations_gb=missing, backward_working_gb=missing, logits_gb=missing,
            predicted_cuda_allocated_gb=missing, predicted_cuda_gb=missing, predicted_cpu_gb=missing,
            predicted_gb=missing, batch_rows=0, batch_padded_length=0, plan_device=plan_device,
            budget_gb=budget_gb, skip=False, plan_error=f"{type(error).__name__}: {error}",
        )  # fmt: skip


@dataclass(frozen=True)
class BatchShape:
    """The batch a run will draw that needs the most memory."""

    rows: int
    padded_length: int
    loss_positions: int


def largest_batch(lengths: list[int], prompt_lengths: list[int], training: TrainingSettings) -> BatchShape:
    """Replay the run's own (seeded) batch order and return its largest padded batch.

    Batches are padded to their longest row, so the peak belongs to the
    largest rows x longest-row batch among those the run will actually draw.
    """
    from lora_study.training.batching import endless_batches

    steps = total_steps(training, len(lengths))
    drawn = itertools.islice(
        endless_batches(lengths, training.batch_size, training.seed, training.group_by_length),
        steps * training.gradient_accumulation_steps,
    )
    largest = BatchShape(0, 0, 0)
    most_positions = 0
    for batch in drawn:
        padded = max(lengths[i] for i in batch)
        if len(batch) * padded > largest.rows * largest.padded_length:
            largest = BatchShape(len(batch), padded, 0)
        # Next-token targets: every response token (the first prompt position predicts nothing).
        most_positions = max(most_positions, sum(lengths[i] - prompt_lengths[i] for i in batch))
    return BatchShape(largest.rows, largest.padded_length, most_positions)


def plan_run(
    run: RunSpec,
    recipe: Recipe,
    model_config,
    facts: ModelFacts,
    targets: Targets,
    batch: BatchShape,
    plan_device: str,
    budget_gb: float | None,
    checkpoint: Checkpoint = Checkpoint(),
    attn_implementation: str = "sdpa",
) -> RunPlan:
    """Predicted peak memory of one run under `recipe`, term by term."""
    training = run.training
    assert training is not None
    activations, per_layer = saved_activation_bytes(
        model_config,
        targets,
        run.rank,
        training.lora_dropout,
        str(recipe.torch_compute_dtype).removeprefix("torch."),
        training.gradient_checkpointing,
        attn_implementation,
        batch.rows,
        batch.padded_length,
        run.method,
        recipe,
        run.layer_ranks,
    )
    logits = logits_bytes(batch.loss_positions, facts.vocab_size, DTYPE_BYTES[recipe.compute_dtype])
    gpus = training.gpus
    if gpus > 1:  # one rank's share of the batch, with full logits (lora_study.training.sharded)
        rows = math.ceil(batch.rows / gpus)
        activations, per_layer = activations * rows / batch.rows, per_layer * rows / batch.rows
        logits = logits_bytes(rows * batch.padded_length, facts.vocab_size, DTYPE_BYTES[recipe.compute_dtype])
    if run.is_full:
        trainable = facts.total_params
        weights = trainable * 4.0  # fp32 masters
        adapter = 0.0
        # Gradients and optimizer moments, and the compute-dtype weight copies autocast keeps for backward.
        copies = trainable * DTYPE_BYTES[recipe.compute_dtype] if recipe.autocast else 0
        gradients_optimizer = trainable * (4 + OPTIMIZER_STATE_BYTES[training.optimizer]) + copies
    else:
        trainable = lora_params(model_config, targets, run.rank, run.method, run.layer_ranks)
        weights = weights_bytes(facts, recipe, run.double_quant)
        adapter = trainable * 4.0
        gradients_optimizer = trainable * (4 + OPTIMIZER_STATE_BYTES[training.optimizer])
    gathered = 0.0
    if gpus > 1:
        gathered = gathered_bytes(facts, recipe, weights, model_config)
        weights, adapter, gradients_optimizer = weights / gpus + gathered, adapter / gpus, gradients_optimizer / gpus
    states = adapter + gradients_optimizer
    allocated = weights + states + activations + per_layer + logits
    cuda = allocated * (1 + CUDA_ALLOCATOR_SLACK) / GB + CUDA_CONTEXT_GB
    cpu = (allocated + cpu_overhead_bytes(run, recipe, facts, checkpoint, activations + per_layer + logits)) / GB
    predicted = cuda if plan_device == "cuda" else cpu
    return RunPlan(
        run_id=run.run_id,
        quantization=run.quantization,
        compute_dtype=recipe.compute_dtype,
        rank=run.rank,
        modules=",".join(run.modules),
        trainable_params=trainable,
        weights_gb=weights / GB,
        lora_states_gb=states / GB,
        activations_gb=activations / GB,
        backward_working_gb=per_layer / GB,
        logits_gb=logits / GB,
        predicted_cuda_allocated_gb=allocated / GB,
        predicted_cuda_gb=cuda,
        predicted_cpu_gb=cpu,
        predicted_gb=predicted,
        batch_rows=batch.rows,
        batch_padded_length=batch.padded_length,
        plan_device=plan_device,
        budget_gb=budget_gb,
        skip=budget_gb is not None and predicted > budget_gb,
        attn_implementation=attn_implementation,
        adapter_weights_gb=adapter / GB,
        gradients_optimizer_gb=gradients_optimizer / GB,
        gpus=gpus,
        gathered_gb=gathered / GB,
    )


def gathered_bytes(facts: ModelFacts, recipe: Recipe, weights: float, model_config) -> float:
    """What a rank of a sharded run holds whole besides its shard: the root unit's weights (embeddings, norms,
    head: FSDP keeps the root gathered through the step) and two decoder layers' (computing and prefetched)."""
    root = _other_bytes(facts, recipe)
    layers = max(1, int(getattr(model_config.get_text_config(), "num_hidden_layers", 1) or 1))
    return root + 2 * (weights - root) / layers


def cpu_overhead_bytes(run: RunSpec, recipe: Recipe, facts: ModelFacts, checkpoint: Checkpoint,
                       transient: float) -> float:  # fmt: skip
    """What a CPU process holds beyond the allocated terms: the runtime, the mapped checkpoint where the recipe
    keeps views of it (less the weights already counted), and the allocator's retention of `transient` bytes."""
    mapped = 0.0
    if checkpoint.shared_by(recipe):
        held_as_stored = facts.total_params * 4.0 if run.is_full else unquantized_bytes(facts, recipe, run.double_quant)
        mapped = checkpoint.bytes - held_as_stored
    return CPU_RUNTIME_GB * GB + mapped + CPU_ALLOCATOR_RETENTION * transient


def plan_study(
    runs: list[RunSpec],
    model_config,
    targets: dict[str, Targets],
    lengths: list[int],
    prompt_lengths: list[int],
    plan_device: str,
    budget_gb: float | None,
    checkpoint: Checkpoint = Checkpoint(),
    recipes: dict[str, Recipe] | None = None,
    attention: dict[str, str] | None = None,
) -> list[RunPlan]:
    """Plan every run (under `recipes[run_id]`, else its recipe on the planned device).

    `targets` and `attention` hold each run's checked targets and resolved
    attention implementation. The planner failing on one run (an
    architecture its meta-device pass cannot take) leaves that run without
    a prediction, logged and reported; it never stops the other runs.
    """
    facts = model_facts(model_config)
    plans = []
    for run in runs:
        assert run.training is not None
        try:
            examples = run.training.train_examples or len(lengths)  # the run's first N rows (train_examples)
            run_lengths, run_prompts = lengths[:examples], prompt_lengths[:examples]
            batch = largest_batch(run_lengths, run_prompts, run.training)
            recipe = (recipes or {}).get(run.run_id) or planning_recipe(run, plan_device)
            attn = (attention or {}).get(run.run_id, "sdpa")

            plan_on = functools.partial(_plan_layout, run, recipe, model_config, facts, targets[run.run_id], batch,
                                        plan_device, budget_gb, checkpoint, attn)  # fmt: skip
            layouts = {
                gpus: plan_on(gpus) for gpus in GPU_COUNTS if layout_problem(run, gpus, len(run_lengths)) is None
            }
            per_gpu = {per_gpu_column(device, gpus): math.nan for device in ("cuda", "cpu") for gpus in GPU_COUNTS}
            for gpus, layout in layouts.items():
                per_gpu[per_gpu_column("cuda", gpus)] = layout.predicted_cuda_gb
                per_gpu[per_gpu_column("cpu", gpus)] = layout.predicted_cpu_gb
            gpus = run.training.gpus
            if gpus == AUTO:
                gpus = auto_gpus(per_gpu, {"device": plan_device, "memory_budget_gb": budget_gb})
            plan = layouts[gpus] if gpus in layouts else plan_on(gpus)
            plan.per_gpu_gb = per_gpu
        except Exception as error:
            log.warning("%s: no memory prediction, the planner failed: %s", run.run_id, error, exc_info=True)
            plan = RunPlan.unplanned(run, plan_device, budget_gb, error)
        plans.append(plan)
    return plans


def _plan_layout(run: RunSpec, *arguments: Any) -> RunPlan:
    """plan_run's plan of `run` laid out on the last of `arguments` devices."""
    *rest, gpus = arguments
    return plan_run(with_gpus(run, gpus), *rest)


def with_gpus(run: RunSpec, gpus: int) -> RunSpec:
    """The run laid out on `gpus` devices (its configuration unchanged)."""
    assert run.training is not None
    return dataclasses.replace(run, training=run.training.replace(gpus=gpus))


def layout_problem(run: RunSpec, gpus: int, train_rows: int) -> str | None:
    """Why `run` cannot be sharded over `gpus` devices with `train_rows` rows of data (None when it can)."""
    assert run.training is not None
    if gpus == 1:
        return None
    problem = sharding_problem(run.method, {**run.training.to_dict(), "gpus": gpus})
    if problem is None and 0 < train_rows % run.training.batch_size < gpus:
        problem = f"each epoch ends with a batch of {train_rows % run.training.batch_size} row(s)"
    return problem


def checkpoint_files(manifest: dict[str, Any]) -> Checkpoint:
    """Size of the model's weight files (what loading maps into memory) and the dtype they store floats in,
    from the safetensors headers."""
    import json
    import struct

    total, dtypes = 0, set()
    for path in Path(manifest["path"]).glob("*.safetensors"):
        total += path.stat().st_size
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        dtypes |= {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    floats = {SAFETENSORS_DTYPES[d] for d in dtypes if d in SAFETENSORS_DTYPES}
    return Checkpoint(total, floats.pop() if len(floats) == 1 else None)


def _model_config(manifest: dict[str, Any]):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(manifest["path"], trust_remote_code=manifest["trust_remote_code"])


def plan_for_run(
    run: RunSpec,
    manifest: dict[str, Any],
    train_rows,
    plan_settings: dict[str, Any] | None,
    recipe: Recipe,
    targets: Targets,
    attn_implementation: str,
) -> dict[str, Any]:
    """One run's plan, as the train job makes it before loading weights (under the job's own recipe)."""
    settings = plan_settings or {"device": "cuda", "memory_budget_gb": None}
    plans = plan_study(
        [run],
        _model_config(manifest),
        {run.run_id: targets},
        [len(ids) for ids in train_rows["input_ids"]],
        list(train_rows["prompt_length"]),
        settings["device"],
        settings["memory_budget_gb"],
        checkpoint_files(manifest),
        recipes={run.run_id: recipe},
        attention={run.run_id: attn_implementation},
    )
    return plans[0].to_dict()


PLAN_SUMMARY_COLUMNS = (
    "run_id",
    "gpus",
    "compute_dtype",
    "trainable_params",
    "weights_gb",
    "lora_states_gb",
    "activations_gb",
    "logits_gb",
    "predicted_cuda_gb",
    "predicted_cpu_gb",
    "skip",
)


def plan_prepared(
    runs: list[RunSpec], settings: dict[str, Any], manifest: dict[str, Any], splits_dir: Path
) -> list[RunPlan]:
    """Plan the trained runs from the model's config and the prepared data (no weights loaded)."""
    from lora_study.prepare.data import load_split

    train = load_split(splits_dir, "train")
    trained = [run for run in runs if not run.is_baseline]
    return plan_study(
        trained,
        _model_config(manifest),
        check_with_manifest(manifest, trained),
        lengths=[len(ids) for ids in train["input_ids"]],
        prompt_lengths=list(train["prompt_length"]),
        plan_device=settings["device"],
        budget_gb=settings["memory_budget_gb"],
        checkpoint=checkpoint_files(manifest),
        attention={run.run_id: resolve_attention(manifest, run.training.attn_implementation) for run in trained},
    )


def write_layout(run: RunSpec, manifest: dict[str, Any], splits_dir: Path, path: Path) -> dict[str, float]:
    """A `gpus: auto` run's predicted peak per device on each of GPU_COUNTS (both devices; no budget: the
    Snakefile applies plan.memory_budget_gb to it, so a budget edit reruns nothing but what it changes)."""
    from lora_study.core.io import write_json

    (plan,) = plan_prepared([run], {"device": "cuda", "memory_budget_gb": None}, manifest, splits_dir)
    if plan.plan_error:
        log.warning("%s: no prediction (%s): `auto` trains it on one device", run.run_id, plan.plan_error)
    write_json(path, plan.per_gpu_gb)
    return plan.per_gpu_gb


def write_plan(
    runs: list[RunSpec],
    settings: dict[str, Any],
    manifest: dict[str, Any],
    splits_dir: Path,
    csv_path: Path,
    markdown_path: Path,
) -> list[RunPlan]:
    """Plan the study from the model's config and the prepared data; write plan.csv and plan.md."""
    import pandas as pd

    from lora_study.core.io import write_table

    plans = plan_prepared(runs, settings, manifest, splits_dir)
    for plan in plans:
        if plan.plan_error:
            continue
        log.info(
            "%s: predicted %.2f GB (%s, %s compute)%s",
            plan.run_id,
            plan.predicted_gb,
            plan.plan_device,
            plan.compute_dtype,
            " > budget: skip" if plan.skip else "",
        )
    table = pd.DataFrame([plan.to_dict() for plan in plans])
    write_table(table, csv_path, markdown_path, PLAN_SUMMARY_COLUMNS)
    return plans
