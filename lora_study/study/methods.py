"""Training methods: LoRA and PEFT's variants, and full fine-tuning (no torch import: the Snakefile reads these)."""

from __future__ import annotations

import math
from typing import Any

from lora_study.core.formats import BITSANDBYTES, FOUR_BIT, UNQUANTIZED

# Effective rank: the fewest singular directions holding this share of an update's energy (its squared
# Frobenius norm).
ENERGY_SHARE = 0.90

LORA = "lora"
DORA = "dora"
RSLORA = "rslora"
PISSA = "pissa"
OLORA = "olora"
EVA = "eva"
CORDA = "corda"
LORA_GA = "lora_ga"
LOFTQ = "loftq"
FULL = "full"
# Initialisations that move part of each base weight into the adapter (the base keeps W - scale B0 A0): the
# trained adapter only fits the changed base, so it is saved converted for the original one (rank 2r).
CONVERTED_METHODS = (PISSA, OLORA, CORDA, LORA_GA)
# Initialisations computed from the run's own first training batches (layer inputs or gradients).
CALIBRATED_METHODS = (EVA, CORDA, LORA_GA)
# Training batches (the run's own first ones, its own order) those initialisations read.
CALIBRATION_BATCHES = 8

# LoraConfig flags per method (peft 0.18+).
PEFT_FLAGS: dict[str, dict[str, Any]] = {
    LORA: {},
    DORA: {"use_dora": True},
    RSLORA: {"use_rslora": True},
    PISSA: {"init_lora_weights": "pissa"},
    OLORA: {"init_lora_weights": "olora"},
    EVA: {"init_lora_weights": "eva"},
    CORDA: {"init_lora_weights": "corda"},
    LORA_GA: {"init_lora_weights": "lora_ga"},
    LOFTQ: {},  # A, B set after PEFT builds the adapter (lora_study.training.initialisation.initialize_loftq)
}
# EVA's redistribution: a layer may get up to rho x r of the study's rank budget (r per layer on average), by the
# share of its input activations' variance the components explain (PEFT's EvaConfig; 2 is PEFT's default).
EVA_RHO = 2.0
# CorDA's mode: instruction-previewed (the adapter takes the components of W that matter most for the run's own
# inputs); the knowledge-preserving mode wants general-knowledge calibration data, which a run does not have.
CORDA_MODE = "ipm"

# rsLoRA scales the update by alpha / sqrt(r) instead of alpha / r. With LoRA's alpha = 2r that is
# 2 sqrt(r): 8 at rank 16, four times LoRA's 2. A constant alpha of 8 gives LoRA's scale at rank 16
# and grows as sqrt(r) across ranks, which is what rsLoRA is for.
RSLORA_ALPHA = 8.0

DESCRIPTIONS = {
    LORA: "LoRA: W + (alpha/r) B A, B initialised to zero",
    DORA: "DoRA (use_dora): the LoRA update applied to the direction of W, with a trained magnitude per output",
    RSLORA: f"rsLoRA (use_rslora): scale alpha/sqrt(r) instead of alpha/r; default alpha {RSLORA_ALPHA:g}",
    PISSA: "PiSSA (init_lora_weights='pissa'): A, B start at the top-r singular vectors of W, the base keeps "
    "the residual; saved converted for the original base (rank 2r)",
    OLORA: "OLoRA (init_lora_weights='olora'): A, B start at a QR factorisation of W, the base keeps the "
    "residual; saved converted for the original base (rank 2r)",
    EVA: f"EVA (init_lora_weights='eva'): A starts at the top singular vectors of each layer's input activations on "
    f"the run's first {CALIBRATION_BATCHES} training batches, B at zero; ranks redistributed across layers by "
    f"explained variance (rho {EVA_RHO:g}: at most {EVA_RHO:g}r per layer, the same rank budget): a per-layer "
    "rank_pattern from the base model's own statistics",
    CORDA: f"CorDA (init_lora_weights='corda', {CORDA_MODE.upper()}): the SVD of W C, C the covariance of each "
    f"layer's inputs on the run's first {CALIBRATION_BATCHES} training batches; the adapter starts at its top-r "
    "part, the base keeps the rest; saved converted for the original base (rank 2r)",
    LORA_GA: f"LoRA-GA (init_lora_weights='lora_ga'): A, B start at the top singular vectors of each weight's "
    f"gradient on the run's first {CALIBRATION_BATCHES} training batches (PEFT's defaults: ArB2r, stable scale), "
    "the base keeps W - scale B0 A0; saved converted for the original base (rank 2r)",
    LOFTQ: "LoftQ (one step, the 4-bit weights fixed): scale B A starts at the top-r SVD of each layer's "
    "quantization error W - Q(W), so the adapted 4-bit model starts nearer the original weights; "
    "4-bit bases only",
    FULL: "full fine-tuning: every weight trained, fp32 master weights and AdamW states, forward and "
    "backward under autocast in the compute dtype",
}


def default_alpha(method: str, rank: int) -> float:
    """The alpha a run gets when its config says `auto`: 2r, or rsLoRA's constant."""
    return RSLORA_ALPHA if method == RSLORA else 2.0 * rank


def lora_scale(method: str, alpha: float, rank: int) -> float:
    """What the update B A is multiplied by."""
    return alpha / math.sqrt(rank) if method == RSLORA else alpha / rank


def method_problem(method: str, quantization: str) -> str | None:
    """Why `method` cannot run on base weights in `quantization`, or None."""
    if method == FULL and quantization not in UNQUANTIZED:
        return (
            f"full fine-tuning trains every weight, which bitsandbytes-quantized ({quantization}) weights cannot "
            f"be; use one of {list(UNQUANTIZED)}"
        )
    if method in CONVERTED_METHODS and quantization in BITSANDBYTES:
        return (
            f"{method} initialises the adapter from the base weights, which PEFT cannot do on bitsandbytes "
            f"({quantization}) weights; use one of {list(UNQUANTIZED)} for {method}"
        )
    if method == LOFTQ and quantization not in FOUR_BIT:
        return (
            f"loftq starts the adapter at the low-rank part of the 4-bit quantization error, which {quantization} "
            f"weights do not have; use one of {list(FOUR_BIT)} for loftq (lora on {quantization})"
        )
    return None


def is_converted(method: str) -> bool:
    return method in CONVERTED_METHODS
