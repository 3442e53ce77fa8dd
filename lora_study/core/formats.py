"""Names of weight formats and compute-dtype settings (no torch import: the Snakefile reads these)."""

from __future__ import annotations

AUTO = "auto"  # compute dtype: the device's fast one, resolved in each job
SIXTEEN_BIT = "16bit"  # quantization: unquantized in the device's fast 16-bit type (fp32 where it has none)
FOUR_BIT = ("nf4", "fp4")
BITSANDBYTES = (*FOUR_BIT, "int8")  # base weights held by bitsandbytes
FLOAT_FORMATS = ("bf16", "fp16", "fp32")
UNQUANTIZED = (SIXTEEN_BIT, *FLOAT_FORMATS)


def quantization_label(quantization: str, double_quant: bool) -> str:
    """`nf4`, `nf4-nodq` (4-bit without double quantization), `int8`, `16bit`, ..."""
    if quantization in FOUR_BIT and not double_quant:
        return f"{quantization}-nodq"
    return quantization


def applies_compute_dtype(quantization: str) -> bool:
    """training.compute_dtype only means something for bitsandbytes weights."""
    return quantization in BITSANDBYTES


WEIGHT_DESCRIPTIONS = {
    "nf4": "linear weights in 4-bit NormalFloat (bitsandbytes)",
    "fp4": "linear weights in 4-bit float (bitsandbytes)",
    "int8": "linear weights in int8 (bitsandbytes LLM.int8)",
    "bf16": "all base weights in bf16",
    "fp16": "all base weights in fp16",
    "fp32": "all base weights in fp32",
}


def recipe_text_rows() -> list[tuple[str, str]]:
    """(quantization, what runs in which dtype) for the methods table; dtypes as resolved per job."""
    shared = (
        "LoRA weights, gradients and optimizer states fp32; norms fp32; embeddings and output head in the "
        "compute dtype; forward and backward under torch.autocast in the compute dtype (none for fp32); "
        "fp16 adds a gradient scaler"
    )
    rows = [
        ("nf4 / fp4", f"{WEIGHT_DESCRIPTIONS['nf4']} (fp4: 4-bit float); 4-bit weights dequantized to the "
         "compute dtype (training.compute_dtype, auto by default) per matmul"),
        ("int8", f"{WEIGHT_DESCRIPTIONS['int8']}; bitsandbytes' int8 matmul casts its inputs to fp16 (on CUDA, "
         "and on CPU in evaluation; CPU training dequantizes the weights per call to the compute dtype); the "
         "rest computes in the compute dtype"),
        ("16bit", "all base weights in the device's fast 16-bit type (bf16 where native, else fp16 on CUDA, "
         "fp32 on a CPU without native bf16); computes in that dtype"),
        ("bf16 / fp16 / fp32", "all base weights in that dtype; computes in it"),
    ]  # fmt: skip
    return [(name, f"{text}; {shared}") for name, text in rows]
