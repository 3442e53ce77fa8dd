"""Load the base model in a run's quantization and wrap it with LoRA."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lora_study.core.errors import UserError
from lora_study.study.methods import CALIBRATED_METHODS, EVA, PEFT_FLAGS
from lora_study.study.modules import Targets, targets_as_given
from lora_study.training.precision import Recipe, apply_recipe, dtype_summary

if TYPE_CHECKING:
    from lora_study.training.initialisation import Calibration

log = logging.getLogger("lora_study")


# The oldest Linux driver each CUDA toolkit of torch's builds needs (NVIDIA's release notes).
MIN_DRIVER_FOR_CUDA = {"11.8": "520", "12.1": "530", "12.4": "550", "12.6": "560", "12.8": "570", "13.0": "580"}
CPU_ANYWAY = "to run on the CPU anyway, hide the GPUs: CUDA_VISIBLE_DEVICES=''"


def pick_device() -> torch.device:
    """The job's first visible GPU; the CPU only when no GPU is visible (or CUDA_VISIBLE_DEVICES hides them).

    A GPU that the driver lists but torch cannot use is an error within seconds, never a quiet
    CPU run that lasts until the cluster's time limit.
    """
    if torch.cuda.is_available():
        check_kernels(torch.cuda.get_device_capability(0), torch.cuda.get_arch_list(), torch.cuda.get_device_name(0))
        return torch.device("cuda", 0)
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip() in ("", "-1"):
        return torch.device("cpu")
    gpus, driver = gpu_evidence()
    if gpus:
        raise UserError(unusable_gpu_message(gpus, driver, torch.__version__, torch.version.cuda))
    if listed:
        # A scheduler can name devices no driver backs (a test cluster's declared GPU): say so, run on CPU.
        log.warning("CUDA_VISIBLE_DEVICES=%s names devices, but no NVIDIA driver answers: running on CPU", listed)
    return torch.device("cpu")


def gpu_evidence() -> tuple[list[str], str | None]:
    """(the GPUs the NVIDIA driver lists, its version) from NVML, else nvidia-smi; ([], None) without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        names = [_text(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
                 for i in range(pynvml.nvmlDeviceGetCount())]  # fmt: skip
        return names, _text(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # no NVML: ask nvidia-smi, if there is one
        pass
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], None
    try:
        listing = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return [], None
    rows = [[part.strip() for part in line.split(",")] for line in listing.stdout.splitlines() if "," in line]
    return ([row[0] for row in rows], rows[0][-1]) if listing.returncode == 0 and rows else ([], None)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def unusable_gpu_message(gpus: list[str], driver: str | None, torch_version: str, torch_cuda: str | None) -> str:
    """Why torch cannot use the GPUs the driver lists, and the fix."""
    listed = f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} ({', '.join(sorted(set(gpus)))})"
    if torch_cuda is None:
        why = f"torch {torch_version} is a CPU-only build (this machine's driver is {driver or 'unknown'})"
        fix = "install the CUDA build (docs/gpu.md, Installing for a GPU)"
    else:
        needed = MIN_DRIVER_FOR_CUDA.get(".".join(torch_cuda.split(".")[:2]))
        why = (f"torch {torch_version} is built for CUDA {torch_cuda}"
               + (f", which needs NVIDIA driver >= {needed}" if needed else "")
               + f"; this machine's driver is {driver or 'unknown'}")  # fmt: skip
        fix = ("update the driver, or install a torch build for an older CUDA that this driver supports "
               "(docs/gpu.md, Installing for a GPU)")  # fmt: skip
    return f"the NVIDIA driver lists {listed} but torch cannot use them: {why}. Fix: {fix}; {CPU_ANYWAY}."


def check_kernels(capability: tuple[int, int], arch_list: list[str], name: str) -> None:
    """Fail when torch has no kernels for this GPU (say a V100, compute capability 7.0, under a build that
    starts at 7.5): sm_XY runs on the same major version at minor >= Y; compute_XY (PTX) on any newer one."""
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit():
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if (kind == "sm" and built[0] == major and built[1] <= minor) or (kind == "compute" and built <= capability):
            return
    raise UserError(
        f"{name} (compute capability {major}.{minor}) has no kernels in torch {torch.__version__} (built for "
        f"{', '.join(arch_list)}): install a torch build that supports it (docs/gpu.md, Installing for a GPU); "
        f"{CPU_ANYWAY}."
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def set_threads(threads: int) -> None:
    """Match torch's intra-op threads to the cores Snakemake gave the job."""
    torch.set_num_threads(max(1, int(threads)))


def load_tokenizer(manifest: dict[str, Any]):
    """The model's tokenizer and the id to pad with (EOS when it defines no pad token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(manifest["path"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad_id


def quantization_config(recipe: Recipe, double_quant: bool):
    """bitsandbytes settings for 4/8-bit runs; None for plain floating point."""
    from transformers import BitsAndBytesConfig

    if recipe.quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=recipe.quantization,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=recipe.torch_compute_dtype,
        )
    if recipe.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(
    manifest: dict[str, Any],
    recipe: Recipe,
    double_quant: bool,
    attn_implementation: str,
    device: torch.device,
    weights_dir: str | None = None,
) -> nn.Module:
    """The base model (or a fully fine-tuned one from `weights_dir`) in the run's weight format.

    Tensors bitsandbytes keeps are in the compute dtype.
    """
    from transformers import AutoModelForCausalLM

    with conversion_failures_as_errors():
        model = AutoModelForCausalLM.from_pretrained(
            weights_dir or manifest["path"],
            # Unquantized weights in their format (fp32 masters for full fine-tuning); the
            # tensors bitsandbytes leaves alone in the compute dtype.
            dtype=recipe.load_dtype,
            quantization_config=quantization_config(recipe, double_quant),
            attn_implementation=attn_implementation,
            device_map={"": str(device)},
            trust_remote_code=manifest["trust_remote_code"],
            # Pickled weights can run code when loaded: only when the config opted in.
            use_safetensors=None if manifest.get("allow_pickle") else True,
        )
    model.config.use_cache = False
    return model


@contextmanager
def conversion_failures_as_errors() -> Iterator[None]:
    """transformers 5 converts weights while loading (bitsandbytes quantization included) and reports a failed
    conversion only as a warning-level load report, then raises a RuntimeError that says "see the report"
    without its cause; with the library's warnings silenced (as in every job) the cause is lost. The report is
    captured here and a failure re-raised with it: out of memory while quantizing becomes a MemoryError
    (status "oom", a result), anything else a RuntimeError that says what failed."""
    import logging as std_logging

    report_logger = std_logging.getLogger("transformers.utils.loading_report")
    captured: list[str] = []

    class Capture(std_logging.Handler):
        def emit(self, record: std_logging.LogRecord) -> None:
            captured.append(record.getMessage())

    handler, level = Capture(std_logging.WARNING), report_logger.level
    report_logger.addHandler(handler)
    report_logger.setLevel(std_logging.WARNING)
    try:
        yield
    except RuntimeError as error:
        if "automatic conversion of the weights" not in str(error):
            raise
        report = "\n".join(captured)
        lines = [line.strip() for line in report.splitlines() if line.strip()]
        from lora_study.training.failures import reads_as_out_of_memory

        memory = [line for line in lines if reads_as_out_of_memory(line)]
        if memory:
            raise MemoryError(f"out of memory while converting the weights: {memory[0][:300]}") from error
        detail = next((line for line in lines if "Error" in line), lines[-1] if lines else "no report")
        raise RuntimeError(f"converting the weights failed: {detail[:300]}") from error
    finally:
        report_logger.removeHandler(handler)
        report_logger.setLevel(level)


def add_lora(
    model: nn.Module,
    recipe: Recipe,
    targets: Targets,
    rank: int,
    alpha: float,
    dropout: float,
    gradient_checkpointing: bool,
    method: str = "lora",
    calibration: Calibration | None = None,
    patterns: dict[str, dict[str, float]] | None = None,
) -> nn.Module:
    """LoRA (or the PEFT variant `method`) on the target modules, with every tensor where the recipe puts it.

    CorDA and LoRA-GA read `calibration()` (the run's first training batches) before PEFT builds the adapter;
    EVA reads them afterwards (lora_study.training.initialisation.initialize_eva) and LoftQ the original weights.
    `patterns`: PEFT's rank_pattern and alpha_pattern (RunSpec.lora_patterns).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from lora_study.training.initialisation import check_initialised, peft_config_extras, preprocess

    if recipe.quantized:
        # Freezes the base, upcasts everything unquantized to fp32; apply_recipe then casts
        # embeddings and head back to the compute dtype (QLoRA practice) and keeps norms fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      **targets.lora_kwargs(), **PEFT_FLAGS[method], **peft_config_extras(method),
                      **(patterns or {}))  # fmt: skip
    if method in CALIBRATED_METHODS and method != EVA:
        if calibration is None:
            raise ValueError(f"{method} initialises from training batches: pass `calibration`")
        preprocess(model, lora, method, calibration(), recipe)
    with targets_as_given():
        model = get_peft_model(model, lora)
    check_initialised(model, method)
    if patterns:
        check_patterns_match(model, patterns)
    model = apply_recipe(model, recipe)
    log.info("parameters by dtype after the %s recipe: %s", recipe.compute_dtype, dtype_summary(model))
    return model


def check_patterns_match(model: nn.Module, patterns: dict[str, dict[str, float]]) -> None:
    """Every rank or alpha pattern matches an adapted layer by PEFT's own rule (get_pattern_key: the end of the
    module name): a pattern matching none would train the uniform rank under the pattern's name."""
    from peft.utils.other import get_pattern_key

    adapted = [name for name, module in model.named_modules() if "default" in getattr(module, "lora_A", {})]
    for kind, pattern in patterns.items():
        for key in pattern:
            if not any(get_pattern_key([key], name) == key for name in adapted):
                example = adapted[0].removeprefix("base_model.model.") if adapted else "none"
                raise UserError(f"{kind} '{key}' matches no adapted layer (it must match the end of a module "
                                f"name, e.g. {example!r}: a layer prefix needs '.*' after it)")  # fmt: skip


def prepare_full(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """Full fine-tuning: every weight trainable (fp32 masters, loaded so by the recipe)."""
    model.requires_grad_(True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info("full fine-tuning; parameters by dtype: %s", dtype_summary(model))
    return model


def load_for_evaluation(
    manifest: dict[str, Any],
    recipe: Recipe,
    double_quant: bool,
    attn_implementation: str,
    device: torch.device,
    adapter_dir: str | None,
    full_weights_dir: str | None = None,
) -> nn.Module:
    """The base model in the run's format with its adapter (if any), cast like in training, KV cache on.

    A fully fine-tuned run is its own weights (`full_weights_dir`), evaluated
    in the format its unquantized base is.
    """
    from peft import PeftModel

    model = load_base_model(manifest, recipe, double_quant, attn_implementation, device, full_weights_dir)
    # Training turns the KV cache off; greedy generation without it recomputes every
    # prefix (measured: 8x slower on the default model).
    model.config.use_cache = True
    if adapter_dir is not None:
        with targets_as_given():
            model = PeftModel.from_pretrained(model, adapter_dir)
    compute_4bit_as_in_training(model)
    return apply_recipe(model, recipe).eval()


def compute_4bit_as_in_training(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer on the arithmetic the run trained with (dequantize, then matmul);
    returns how many layers it applies to.

    bitsandbytes 0.50 repacks a Linear4bit's weight at its first forward without gradients on CPUs with
    AVX512-BF16 (also under ATEN_CPU_CAPABILITY=avx2, which it does not read) and computes with a fused bf16
    kernel from then on, in fp32 recipes too. Measured on an NF4 run of the default study
    (bench/eval_4bit_paths.py): perplexity 0.14 % off the trained arithmetic, 12 of 64 greedy answers
    changed, perplexity 3.7x slower. PEFT's DoRA reads the repacked weight with the generic routine and
    gets wrong norms (perplexity 377,000 unmerged against 5.2 merged). Other CPUs never repack. On CUDA this
    changes nothing: bitsandbytes may run batches of up to 256 rows through a fused kernel of its own there,
    so GPU evaluation is not training's arithmetic bit for bit (the same for every run, and for a training
    job's own evaluation, which takes the same path).
    """
    from bitsandbytes.nn import Linear4bit

    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as unpacked elements."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        # bitsandbytes packs two 4-bit values per byte into a uint8 tensor.
        if param.__class__.__name__ == "Params4bit":
            count *= 2
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
