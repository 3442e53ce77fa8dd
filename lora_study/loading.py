"""Load the base model in a run's quantization and wrap it with LoRA."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

log = logging.getLogger("lora_study")

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


def pick_device() -> torch.device:
    """CUDA when present (the job's first visible GPU), else CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


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


def quantization_config(quantization: str, double_quant: bool, compute_dtype: str):
    """bitsandbytes settings for 4/8-bit runs; None for plain floating point."""
    from transformers import BitsAndBytesConfig

    if quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=DTYPES[compute_dtype],
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(
    manifest: dict[str, Any],
    quantization: str,
    double_quant: bool,
    compute_dtype: str,
    attn_implementation: str,
    device: torch.device,
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    quant = quantization_config(quantization, double_quant, compute_dtype)
    # Quantized runs keep their non-quantized tensors in the compute dtype (QLoRA practice).
    dtype = DTYPES[compute_dtype] if quant is not None else DTYPES[quantization]
    model = AutoModelForCausalLM.from_pretrained(
        manifest["path"],
        dtype=dtype,
        quantization_config=quant,
        attn_implementation=attn_implementation,
        device_map={"": str(device)},
        trust_remote_code=manifest["trust_remote_code"],
        # Pickled weights can run code when loaded: only when the config opted in.
        use_safetensors=None if manifest.get("allow_pickle") else True,
    )
    model.config.use_cache = False
    return model


def add_lora(
    model: nn.Module,
    target_modules: list[str] | str,
    rank: int,
    alpha: float,
    dropout: float,
    fan_in_fan_out: bool,
    quantized: bool,
    gradient_checkpointing: bool,
) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=fan_in_fan_out,
    )
    return get_peft_model(model, lora)


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
