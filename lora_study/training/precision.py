"""The precision recipe: which dtype a run computes in, on which device, and how.

One definition used by training, evaluation, the planner and the benchmarks.

`auto` resolves per job from the device's capability: CUDA -> bf16 where the
GPU has native bf16, else fp16; CPU -> bf16 only where the CPU has native bf16
arithmetic (AVX-512 BF16 or AMX-BF16, and torch/oneDNN dispatch to it), else
fp32 (emulated bf16 is ~16x slower than fp32). The quantization `16bit` is the
unquantized reference in "the device's fast 16-bit type", resolved the same way.

The recipe (QLoRA practice, what `transformers.Trainer(bf16=True)` runs):
frozen base weights in the run's format; LoRA weights and optimizer states in
fp32; norms in fp32; embeddings and output head in the compute dtype (the
QLoRA reference casts them back after `prepare_model_for_kbit_training`
upcast them); forward and backward under `torch.autocast` in the compute
dtype, with a gradient scaler for fp16. Quantized and 16-bit runs then differ
only in how the linear layers' weights are held.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lora_study.core.formats import AUTO, BITSANDBYTES, SIXTEEN_BIT, WEIGHT_DESCRIPTIONS
from lora_study.training.loss import causal_lm

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# CPU flags that mean native bf16 arithmetic (Linux /proc/cpuinfo names).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# torch's CPU dispatch levels below AVX-512: bf16 kernels there are emulated.
CPU_CAPABILITIES_WITHOUT_BF16 = ("DEFAULT", "AVX", "AVX2", "NO AVX")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that exclude its bf16 kernels.
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class DeviceCapability:
    """What decides the fast dtype of a device; recorded with every job's metrics."""

    device_type: str  # "cuda" or "cpu"
    name: str  # GPU name, or the CPU model
    cpu_capability: str | None = None  # torch.backends.cpu.get_cpu_capability()
    cpu_bf16_flags: tuple[str, ...] = ()  # which of CPU_BF16_FLAGS the CPU reports
    onednn_max_isa: str | None = None  # ONEDNN_MAX_CPU_ISA, when set
    cuda_compute_capability: str | None = None  # e.g. "9.0"
    cuda_native_bf16: bool | None = None  # torch.cuda.is_bf16_supported(including_emulation=False)

    @property
    def native_bf16(self) -> bool:
        if self.device_type == "cuda":
            return bool(self.cuda_native_bf16)
        dispatch_ok = (self.cpu_capability or "DEFAULT").upper() not in CPU_CAPABILITIES_WITHOUT_BF16
        onednn_ok = (self.onednn_max_isa or "ALL").upper() not in ONEDNN_ISAS_WITHOUT_BF16
        return bool(self.cpu_bf16_flags) and dispatch_ok and onednn_ok

    @property
    def fast_dtype(self) -> str:
        """The 16-bit type this device computes fast in, or fp32 where it has none."""
        if self.native_bf16:
            return "bf16"
        return "fp16" if self.device_type == "cuda" else "fp32"

    def summary(self) -> str:
        """One line for logs and tables: 'cpu AVX512 (avx512_bf16): bf16'."""
        if self.device_type == "cuda":
            detail = f"sm {self.cuda_compute_capability}"
        else:
            flags = ",".join(self.cpu_bf16_flags) or "no bf16 flags"
            isa = f", oneDNN<={self.onednn_max_isa}" if self.onednn_max_isa else ""
            detail = f"{self.cpu_capability} ({flags}{isa})"
        return f"{self.device_type} {self.name} {detail}: native bf16 {'yes' if self.native_bf16 else 'no'}"

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["cpu_bf16_flags"] = ",".join(self.cpu_bf16_flags)
        record["native_bf16"] = self.native_bf16
        record["summary"] = self.summary()
        return record


def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if not line.strip():
                    break  # end of the first processor's block
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def detect_capability(device: torch.device) -> DeviceCapability:
    """The capability of `device` as this process will use it (dispatch settings included)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return DeviceCapability(
            device_type="cuda",
            name=torch.cuda.get_device_name(device),
            cuda_compute_capability=f"{major}.{minor}",
            cuda_native_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
        )
    cpuinfo = _cpuinfo()
    flags = set((cpuinfo.get("flags") or cpuinfo.get("Features") or "").split())
    return DeviceCapability(
        device_type="cpu",
        name=cpuinfo.get("model name") or platform.processor() or platform.machine(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_bf16_flags=tuple(flag for flag in CPU_BF16_FLAGS if flag in flags),
        onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or None,
    )


def resolve_dtype(setting: str, capability: DeviceCapability) -> str:
    """`auto` -> the device's fast dtype; an explicit bf16/fp16/fp32 stays as it is."""
    if setting == AUTO:
        return capability.fast_dtype
    if setting not in DTYPES:
        raise ValueError(f"unknown dtype setting {setting!r}: expected auto, bf16, fp16 or fp32")
    return setting


@dataclass(frozen=True)
class Recipe:
    """How one run holds its weights and computes, resolved for one device."""

    quantization: str  # as configured: nf4, fp4, int8, 16bit, bf16, fp16, fp32
    weight_format: str  # what the frozen linear weights are: nf4/fp4/int8, or the resolved float dtype
    compute_dtype: str  # bf16, fp16 or fp32

    @property
    def quantized(self) -> bool:
        return self.quantization in BITSANDBYTES

    @property
    def autocast(self) -> bool:
        return self.compute_dtype != "fp32"

    @property
    def grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
        return self.compute_dtype == "fp16"

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    @property
    def master_weights(self) -> bool:
        """Full fine-tuning: fp32 weights (and states) trained under autocast in the compute dtype."""
        return self.weight_format == "fp32" and self.compute_dtype != "fp32"

    @property
    def load_dtype(self) -> torch.dtype:
        """What unquantized weights are loaded in: the weight format, else (bitsandbytes) the compute dtype."""
        return DTYPES.get(self.weight_format, self.torch_compute_dtype)

    def autocast_context(self, device_type: str) -> contextlib.AbstractContextManager:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.torch_compute_dtype)

    def describe(self) -> str:
        """The methods section's line for this recipe."""
        return f"{WEIGHT_DESCRIPTIONS.get(self.weight_format, self.weight_format + ' weights')}; {self.matmul_text()}"

    def matmul_text(self) -> str:
        if self.quantization == "int8":
            return (
                "int8 matmul by bitsandbytes (LLM.int8: inputs cast to fp16, outliers kept in fp16; CPU training "
                f"dequantizes the weights per call instead), everything else in {self.compute_dtype}"
            )
        if self.quantized:
            return f"4-bit weights dequantized to {self.compute_dtype} per matmul"
        if self.master_weights:
            return f"fp32 master weights, matmuls in {self.compute_dtype} under autocast"
        return f"matmuls in {self.compute_dtype}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantization": self.quantization,
            "weight_format": self.weight_format,
            "compute_dtype": self.compute_dtype,
            "autocast": self.autocast,
            "grad_scaler": self.grad_scaler,
        }


def recipe_for(
    quantization: str, compute_dtype: str | None, capability: DeviceCapability, full: bool = False
) -> Recipe:
    """The recipe of a run with this quantization on this device.

    `compute_dtype` applies to bitsandbytes runs only; an unquantized run
    computes in its own weight dtype (`16bit`: the device's fast one). Full
    fine-tuning (`full`) keeps fp32 master weights and computes in that dtype
    under autocast (mixed precision).
    """
    if quantization in BITSANDBYTES:
        return Recipe(quantization, quantization, resolve_dtype(compute_dtype or AUTO, capability))
    weights = capability.fast_dtype if quantization == SIXTEEN_BIT else quantization
    if weights not in DTYPES:
        raise ValueError(f"unknown quantization {quantization!r}")
    return Recipe(quantization, "fp32" if full else weights, weights)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def apply_recipe(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Cast a (PEFT-wrapped) model's tensors to the recipe: norms and LoRA fp32; embeddings, head and
    MoE expert weights in the compute dtype.

    Quantized tensors (bitsandbytes' uint8/int8 weights) are never touched.
    """
    lm = causal_lm(model)
    for module in (lm.get_input_embeddings(), lm.get_output_embeddings()):
        if module is not None:
            _cast_float_params(module, recipe.torch_compute_dtype)
    for name, param in model.named_parameters():
        # Mixture-of-experts weights are 3-D parameters bitsandbytes does not quantize, and
        # prepare_model_for_kbit_training upcasts them to fp32 (twice the 16-bit model's experts).
        if param.dim() >= 3 and param.dtype.is_floating_point and "lora_" not in name:
            param.data = param.data.to(recipe.torch_compute_dtype)
    for module in model.modules():
        if is_norm(module):
            _cast_float_params(module, torch.float32)
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def _cast_float_params(module: nn.Module, dtype: torch.dtype) -> None:
    for param in module.parameters(recurse=True):
        if param.dtype.is_floating_point and param.dtype != dtype:
            param.data = param.data.to(dtype)


def dtype_summary(model: nn.Module) -> dict[str, int]:
    """Parameter count per dtype (logged: what the recipe left where)."""
    counts: dict[str, int] = {}
    for param in model.parameters():
        key = str(param.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + param.numel()
    return counts


class GradScaling:
    """torch.amp.GradScaler when the recipe needs one, else a pass-through with the same calls."""

    def __init__(self, recipe: Recipe, device_type: str) -> None:
        self.enabled = recipe.grad_scaler
        self.scaler = torch.amp.GradScaler(device_type) if self.enabled else None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    @property
    def scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler else None

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"


class _OncePerMessage(logging.Filter):
    """Lets the first record of each message template through, drops its repeats."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, tuple]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (str(record.msg), tuple(str(a) for a in (record.args or ())))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextlib.contextmanager
def quiet_int8_casts() -> Iterator[None]:
    """bitsandbytes logs on every int8 matmul that it casts inputs to fp16: keep one line per dtype."""
    logger = logging.getLogger(INT8_CAST_LOGGER)
    once = _OncePerMessage()
    logger.addFilter(once)
    try:
        yield
    finally:
        logger.removeFilter(once)
