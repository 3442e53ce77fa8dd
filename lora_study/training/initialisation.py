"""Adapter initialisations that read more than the base weights: the run's own first training batches (EVA,
CorDA, LoRA-GA, all PEFT's) or the base model's original weights behind a 4-bit one (LoftQ)."""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_study.core.errors import UserError
from lora_study.study.methods import CALIBRATION_BATCHES, CORDA, CORDA_MODE, EVA, EVA_RHO, LORA_GA
from lora_study.training.precision import Recipe

log = logging.getLogger("lora_study")

Batches = list[dict[str, torch.Tensor]]
Calibration = Callable[[], Batches]  # the run's first training batches, built only when a method reads them
ADAPTER = "default"


def calibration_batches(train_rows, pad_id: int, training, device: torch.device) -> Batches:
    """The run's first CALIBRATION_BATCHES training batches, in its own order (what its first steps will see)."""
    from lora_study.training.batching import collate, endless_batches

    lengths = [len(ids) for ids in train_rows["input_ids"]]
    order = endless_batches(lengths, training.batch_size, training.seed, training.group_by_length)
    return [{key: value.to(device) for key, value in collate([train_rows[i] for i in rows], pad_id).items()}
            for rows in itertools.islice(order, CALIBRATION_BATCHES)]  # fmt: skip


def peft_config_extras(method: str) -> dict[str, Any]:
    """The LoraConfig sub-configuration a method needs (PEFT's defaults otherwise)."""
    if method == EVA:
        from peft import EvaConfig

        return {"eva_config": EvaConfig(rho=EVA_RHO)}
    if method == CORDA:
        from peft.tuners.lora.config import CordaConfig

        return {"corda_config": CordaConfig(corda_method=CORDA_MODE, verbose=False)}
    if method == LORA_GA:
        from peft.tuners.lora.config import LoraGAConfig

        return {"lora_ga_config": LoraGAConfig()}
    return {}


def preprocess(model: nn.Module, lora_config, method: str, batches: Batches, recipe: Recipe) -> None:
    """What PEFT must know before it builds a CorDA or LoRA-GA adapter: each target layer's input covariance
    (CorDA) or its weight's gradient (LoRA-GA) on `batches`. Other methods need nothing."""
    device_type = batches[0]["input_ids"].device.type if batches else "cpu"
    if method == CORDA:
        from peft.tuners.lora.corda import preprocess_corda

        def run_model() -> None:
            # Row by row without padding: a padded position's activations would enter every covariance.
            with torch.no_grad(), recipe.autocast_context(device_type):
                for batch in batches:
                    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                        model(input_ids=ids[mask.bool()].unsqueeze(0))

        preprocess_corda(model, lora_config, run_model=run_model)
        log.info("CorDA (%s) covariances from %d batches", CORDA_MODE, len(batches))
    elif method == LORA_GA:
        from peft.tuners.lora.loraga import preprocess_loraga

        def train_step() -> None:
            # The mean response-token loss of each batch (the training loss), gradients summed; PEFT averages them.
            for batch in batches:
                with recipe.autocast_context(device_type):
                    loss = model(**batch).loss
                loss.backward()

        with warnings.catch_warnings():  # PEFT counts backward calls with hooks on modules whose inputs need none
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            preprocess_loraga(model, lora_config, train_step)
        log.info("LoRA-GA gradients from %d batches", len(batches))


def check_initialised(model: nn.Module, method: str) -> None:
    """PEFT builds a LoRA-GA layer whose weight got no gradient with LoRA's own initialisation (B = 0), silently:
    such a run would train something other than LoRA-GA, so it stops, naming the layers."""
    if method != LORA_GA:
        return
    plain = [name for name, module in model.named_modules()
             if ADAPTER in getattr(module, "lora_B", {}) and not module.lora_B[ADAPTER].weight.any()]  # fmt: skip
    if plain:
        raise UserError(f"lora_ga: {len(plain)} adapted layer(s) got no gradient on the calibration batches and "
                        f"would start as plain LoRA ({plain[0]}, ...): target modules the forward uses")  # fmt: skip


def initialize_eva(model: nn.Module, batches: Batches, recipe: Recipe) -> dict[str, int]:
    """EVA's initialisation (PEFT): the layer inputs of `batches`, their incremental SVD per adapted layer, A set
    to the top components and the ranks redistributed by explained variance. Returns the per-layer ranks (PEFT's
    rank_pattern; empty when every layer kept r).

    The forward passes run as training's do, under the recipe's autocast (16-bit weights behind fp32 norms need
    it); PEFT's hooks take each layer's inputs in fp32 for the SVD."""
    from peft import initialize_lora_eva_weights

    device_type = batches[0]["input_ids"].device.type if batches else "cpu"
    with recipe.autocast_context(device_type):
        initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
    pattern = dict(model.peft_config[ADAPTER].rank_pattern or {})
    ranks = sorted(pattern.values())
    log.info("EVA initialised on %d batches: per-layer ranks %s", len(batches),
             f"{ranks[0]}-{ranks[-1]} over {len(ranks)} layers" if ranks else "unchanged")  # fmt: skip
    return pattern


def initialize_loftq(model: nn.Module, weights_dir: str) -> dict[str, float]:
    """LoftQ's initialisation with the 4-bit weights kept (one alternating step, PEFT's replace_lora_weights_loftq
    without its CUDA-only path): for each adapted 4-bit layer, scale * B A = the top-r SVD of W - Q(W), W read from
    the base's own safetensors. Scale-aware, so the adapted model starts at Q(W) + that part whatever alpha is.
    Returns each layer's relative quantization error before and after (Frobenius norms, for the log and tests)."""
    import bitsandbytes as bnb

    originals = OriginalWeights(weights_dir)
    errors: dict[str, float] = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, bnb.nn.Linear4bit) or ADAPTER not in getattr(module, "lora_A", {}):
            continue
        weight = originals.get(name).to(base.weight.device, torch.float32)
        quantized = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        residual = weight - quantized
        rank, scale = module.r[ADAPTER], module.scaling[ADAPTER]
        left, singular, right = torch.linalg.svd(residual, full_matrices=False)
        root = singular[:rank].sqrt() / math.sqrt(scale)
        lora_a, lora_b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
        lora_a.data = (root[:, None] * right[:rank]).to(lora_a.dtype)
        lora_b.data = (left[:, :rank] * root).to(lora_b.dtype)
        after = residual - scale * lora_b.data.float() @ lora_a.data.float()
        errors[name] = float(after.norm() / residual.norm()) if residual.norm() > 0 else 0.0
    if not errors:
        raise UserError("loftq: the model has no 4-bit layer with an adapter (loftq needs nf4 or fp4 weights)")
    adapted = sum(ADAPTER in getattr(module, "lora_A", {}) for module in model.modules())
    if adapted > len(errors):  # layers bitsandbytes left unquantized have no quantization error to start from
        log.warning("LoftQ: %d of %d adapted layers are not 4-bit and start as plain LoRA", adapted - len(errors),
                    adapted)  # fmt: skip
    kept = sorted(errors.values())
    log.info("LoftQ initialised %d layers: quantization error left %.3f-%.3f of W - Q(W)", len(errors), kept[0],
             kept[-1])  # fmt: skip
    return errors


class OriginalWeights:
    """The base model's unquantized tensors by module name, read one at a time from its safetensors files."""

    PEFT_PREFIX = "base_model.model."

    def __init__(self, weights_dir: str) -> None:
        from safetensors import safe_open

        self.files: dict[str, Path] = {}
        for path in sorted(Path(weights_dir).glob("*.safetensors")):
            with safe_open(path, framework="pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), path))
        self.weights_dir = weights_dir

    def get(self, module_name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = module_name.removeprefix(self.PEFT_PREFIX) + ".weight"
        if key not in self.files:
            raise UserError(f"loftq reads each adapted layer's original weight by name from {self.weights_dir}, "
                            f"which holds no '{key}' (its checkpoint names its tensors differently): use lora "
                            "on this model")  # fmt: skip
        with safe_open(self.files[key], framework="pt") as handle:
            return handle.get_tensor(key)
