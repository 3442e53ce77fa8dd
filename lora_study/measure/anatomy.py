"""Adapter anatomy: the singular values of each layer's learned update, and how much of its rank it uses.

The update of a layer is its merged weight minus its base weight, in fp32,
on the base weight the run trained against (bitsandbytes weights
dequantized). That covers every method: for LoRA and rsLoRA it is the scaled
product B A; DoRA also rescales each output's norm; a PiSSA/OLoRA adapter is
saved converted for the original base (rank 2r); full fine-tuning's update is
the trained weight minus the base weight.

A plain LoRA or rsLoRA adapter needs no base weight at all: its update's
singular values are those of the r x r core of its factors (factor_updates),
read straight from the adapter file.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_study.core.io import atomic_path
from lora_study.study.methods import ENERGY_SHARE
from lora_study.study.modules import Layout, manifest_layout, names_match, targets_as_given
from lora_study.study.sweep import RunSpec

log = logging.getLogger("lora_study")

TOP_VALUES = 8  # leading singular values kept per layer (the top of full fine-tuning's spectrum)


@dataclass(frozen=True)
class LayerUpdate:
    """One layer's update, summarised by its spectrum."""

    layer: str  # full module name
    group: str  # logical group (q, k, v, o, qkv, mlp) or the layer's own name
    rows: int
    cols: int
    norm: float  # Frobenius norm of the update
    effective_rank: int
    top_energy_share: float  # share of the energy in the TOP_VALUES leading directions
    singular_values: str  # the leading TOP_VALUES, space-separated


def effective_rank(singular_values: torch.Tensor, share: float = ENERGY_SHARE) -> int:
    """The fewest leading directions whose squared singular values reach `share` of the total (0: no update)."""
    energy = singular_values.double().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # A tolerance: equal values must not need one more direction because of rounding.
    return int(torch.searchsorted(cumulative, torch.tensor(share - 1e-9, dtype=torch.float64)).item()) + 1


def summarise(layer: str, group: str, update: torch.Tensor) -> LayerUpdate:
    return from_singular_values(layer, group, update.shape[0], update.shape[1], torch.linalg.svdvals(update.double()))


def from_singular_values(layer: str, group: str, rows: int, cols: int, singular: torch.Tensor) -> LayerUpdate:
    """The summary of an update of shape (rows, cols) with these singular values (descending; any not given
    are zero)."""
    singular = torch.nn.functional.pad(singular.double(), (0, max(0, TOP_VALUES - len(singular))))
    energy = singular.pow(2)
    total = float(energy.sum())
    top = singular[:TOP_VALUES]
    return LayerUpdate(
        layer=layer,
        group=group,
        rows=rows,
        cols=cols,
        norm=math.sqrt(total),
        effective_rank=effective_rank(singular),
        top_energy_share=float(energy[:TOP_VALUES].sum()) / total if total else 0.0,
        singular_values=" ".join(f"{value:.6g}" for value in top.tolist()),
    )


def group_of(layout: Layout | None, layer: str) -> str:
    """The logical group(s) a layer belongs to ('qkv' for a fused projection), else its own name."""
    leaf = layer.rsplit(".", 1)[-1]
    if layout is not None:
        groups = [g for g, names in layout.groups.items() if any(names_match(layer, n) for n in names)]
        if groups:
            return "".join(groups) if all(len(g) == 1 for g in groups) else "+".join(groups)
    return leaf


def layer_update(module, adapter: str = "default") -> torch.Tensor:
    """One adapted layer's merged minus base weight (fp32), on the base weight as the run trained against it.

    The base weight is dequantized from the run's own format (the 4/8-bit weights
    DoRA's magnitudes were initialised from): merging into other weights would add
    a rescaling of every row that training never made. LoRA, rsLoRA and converted
    PiSSA/OLoRA updates are PEFT's delta weight; DoRA's is its merge (PEFT's weight norm).
    """
    from peft.utils.integrations import dequantize_module_weight
    from peft.utils.other import transpose

    base = dequantize_module_weight(module.get_base_layer()).detach().float()
    delta = module.get_delta_weight(adapter).detach().float()
    if not module.use_dora.get(adapter, False):
        return delta
    magnitude = module.lora_magnitude_vector[adapter]
    norm = magnitude.get_weight_norm(base, transpose(delta, module.fan_in_fan_out), scaling=1).detach()
    factor = transpose((magnitude.weight.detach().float() / norm).view(-1, 1), module.fan_in_fan_out)
    return factor * (base + delta) - base


def adapter_updates(model: nn.Module, layout: Layout | None) -> list[LayerUpdate]:
    """Each adapted linear layer's update, layer by layer."""
    from peft.tuners.lora import LoraLayer

    updates = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            if type(module).__name__ == "ParamWrapper":
                continue  # experts' 3-D parameters: one update per expert, not a layer's (not covered)
            layer = _layer_name(name)
            updates.append(summarise(layer, group_of(layout, layer), layer_update(module)))
    return updates


def _layer_name(name: str) -> str:
    """The model's own module name, without PEFT's wrapper prefix."""
    return name.removeprefix("base_model.model.")


def full_updates(trained: nn.Module, base: nn.Module, layout: Layout | None) -> list[LayerUpdate]:
    """Full fine-tuning: trained minus base weight of every linear layer in the body (not the output head)."""
    base_layers = dict(base.named_modules())
    output_head = trained.get_output_embeddings()
    updates = []
    for name, module in trained.named_modules():
        if not isinstance(module, nn.Linear) or module is output_head:
            continue
        update = module.weight.detach().float() - base_layers[name].weight.detach().float()
        updates.append(summarise(name, group_of(layout, name), update))
    return updates


def run_anatomy(manifest: dict[str, Any], weights_dir: Path, run: RunSpec, out_path: Path, threads: int,
                memory_limit_gb: float | None = None) -> int:  # fmt: skip
    """Write one run's per-layer update spectra to `out_path`; returns the number of layers.

    Adapters are read on the base model in the run's own format (bitsandbytes
    weights dequantized per layer); full fine-tuning compares fp32 weights.
    Out of memory (under `memory_limit_gb`, or a model too large for the
    node) writes one row that says so (column `oom`) and no layers.
    """
    torch.set_num_threads(max(1, threads))
    layout = manifest_layout(manifest)
    if not any(weights_dir.glob("*.safetensors")):
        log.info("%s holds no trained weights (the run did not train): nothing to measure", weights_dir)
        return _write(out_path, [])
    assert run.training is not None
    from lora_study.training.failures import oom_as_data

    outcome: dict[str, Any] = {}
    with oom_as_data(outcome, "anatomy", memory_limit_gb):
        return _write(out_path, _updates(manifest, weights_dir, run, layout))
    log.error("%s: anatomy did not fit in memory: no layers measured, recorded as data", run.run_id)
    return _write(out_path, [], oom=outcome["oom"]["anatomy"])


# Adapter settings under which an update is exactly scale x B A of the saved factors.
_NOT_PLAIN = ("use_dora", "target_parameters", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_pattern")
_FACTOR = re.compile(r"^(?:base_model\.model\.)?(?P<layer>.+)\.lora_A\.weight$")


def factor_updates(weights_dir: Path, layout: Layout | None) -> list[LayerUpdate] | None:
    """Plain LoRA and rsLoRA: each layer's update is scale x B A, read straight from the adapter file. With
    B = Q_B R_B and A^T = Q_A R_A, B A = Q_B (R_B R_A^T) Q_A^T, so its singular values are those of the r x r
    core: no base model, no full-size decomposition. None for any other adapter (DoRA rescales rows by the base
    weight's norms, experts and per-layer patterns are not one scale): the caller loads the model."""
    from safetensors.torch import load_file

    config = json.loads((weights_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA" or any(config.get(key) for key in _NOT_PLAIN):
        return None
    # Conv1D layers (GPT-2) store the update transposed, and PEFT's saved fan_in_fan_out speaks for the last
    # layer it wrapped only: which layers are Conv1D is the model's to say.
    if config.get("fan_in_fan_out") or (layout is not None and layout.fan_in_fan_out):
        return None
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = load_file(weights_dir / "adapter_model.safetensors")
    updates = []
    for key in sorted(tensors, key=_natural):
        match = _FACTOR.match(key)
        if not match:
            continue
        layer = match["layer"]
        down, up = tensors[key].double(), tensors[f"{key[: -len('lora_A.weight')]}lora_B.weight"].double()
        core = torch.linalg.qr(up).R @ torch.linalg.qr(down.T).R.T
        rows, cols = up.shape[0], down.shape[1]
        updates.append(from_singular_values(layer, group_of(layout, layer), rows, cols,
                                            scale * torch.linalg.svdvals(core)))  # fmt: skip
    return updates


def _natural(name: str) -> list[Any]:
    """layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _updates(manifest: dict[str, Any], weights_dir: Path, run: RunSpec, layout: Layout) -> list[LayerUpdate]:
    assert run.training is not None
    updates = None if run.is_full else factor_updates(weights_dir, layout)
    if updates is None:
        updates = _updates_on_the_base(manifest, weights_dir, run, layout)
    median = sorted(u.effective_rank for u in updates)[len(updates) // 2] if updates else "-"
    log.info("%s: %d layers; effective rank (%.0f%% of the energy): median %s", run.run_id, len(updates),
             100 * ENERGY_SHARE, median)  # fmt: skip
    return updates


def _updates_on_the_base(manifest: dict[str, Any], weights_dir: Path, run: RunSpec, layout: Layout
                         ) -> list[LayerUpdate]:  # fmt: skip
    from lora_study.training.loading import load_base_model
    from lora_study.training.precision import detect_capability, recipe_for

    assert run.training is not None
    cpu = torch.device("cpu")
    # Full fine-tuning's recipe loads fp32 masters. Attention never runs here: eager exists for every model.
    recipe = recipe_for(run.quantization, run.training.compute_dtype, detect_capability(cpu), full=run.is_full)
    base = load_base_model(manifest, recipe, run.double_quant, "eager", cpu)
    if run.is_full:
        trained = load_base_model(manifest, recipe, run.double_quant, "eager", cpu, str(weights_dir))
        updates = full_updates(trained, base, layout)
    else:
        from peft import PeftModel

        with targets_as_given():
            adapter = PeftModel.from_pretrained(base, str(weights_dir))
        updates = adapter_updates(adapter, layout)
    return updates


FIELDS = tuple(f.name for f in fields(LayerUpdate))
OOM_FIELD = "oom"  # set on the one row of a run whose anatomy did not fit in memory


def _write(out_path: Path, updates: list[LayerUpdate], oom: str | None = None) -> int:
    with atomic_path(out_path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=(*FIELDS, OOM_FIELD))
        writer.writeheader()
        writer.writerows(asdict(u) for u in updates)
        if oom is not None:
            writer.writerow({OOM_FIELD: oom})
    return len(updates)
