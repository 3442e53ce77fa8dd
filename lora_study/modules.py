"""Logical target-module groups (q, k, v, o, mlp, all-linear) per architecture."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

LOGICAL_GROUPS: tuple[str, ...] = ("q", "k", "v", "o", "mlp")
ALL_LINEAR = "all-linear"
# Order in which logical groups appear in run ids ("qkvo-mlp").
ATTENTION_GROUPS: tuple[str, ...] = ("q", "k", "v", "o")


@dataclass(frozen=True)
class ArchitectureModules:
    """Module names for each logical group in one architecture family."""

    groups: dict[str, tuple[str, ...]]
    # Projections stored as one fused layer: requesting part of it is an error.
    fused: tuple[tuple[str, ...], ...] = ()
    # Conv1D layers (GPT-2) store weights transposed; PEFT needs to know.
    fan_in_fan_out: bool = False
    notes: str = field(default="", compare=False)


_LLAMA_LIKE = ArchitectureModules(
    groups={
        "q": ("q_proj",),
        "k": ("k_proj",),
        "v": ("v_proj",),
        "o": ("o_proj",),
        "mlp": ("gate_proj", "up_proj", "down_proj"),
    }
)

ARCHITECTURES: dict[str, ArchitectureModules] = {
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "phi": ArchitectureModules(
        groups={
            "q": ("q_proj",),
            "k": ("k_proj",),
            "v": ("v_proj",),
            "o": ("dense",),
            "mlp": ("fc1", "fc2"),
        },
        notes="Phi-2's attention output projection is `dense`; its MLP is fc1, fc2.",
    ),
    "gpt2": ArchitectureModules(
        groups={
            "q": ("c_attn",),
            "k": ("c_attn",),
            "v": ("c_attn",),
            "o": ("attn.c_proj",),
            "mlp": ("c_fc", "mlp.c_proj"),
        },
        fused=(("q", "k", "v"),),
        fan_in_fan_out=True,
        notes="GPT-2 fuses q, k, v into one c_attn Conv1D layer.",
    ),
}


class ModuleResolutionError(ValueError):
    """Requested target modules do not exist in the model."""


def modules_label(modules: Sequence[str]) -> str:
    """Short, stable label for run ids: [q,k,v,o,mlp] -> 'qkvo-mlp'."""
    requested = set(modules)
    if requested == {ALL_LINEAR}:
        return "all"
    attention = "".join(g for g in ATTENTION_GROUPS if g in requested)
    parts = [attention] if attention else []
    if "mlp" in requested:
        parts.append("mlp")
    explicit = sorted(requested - set(LOGICAL_GROUPS) - {ALL_LINEAR})
    if explicit:
        parts.append("+".join(explicit))
    return "-".join(parts)


def canonical_modules(modules: Sequence[str]) -> list[str]:
    """Logical groups in q,k,v,o,mlp order, then explicit names sorted."""
    requested = set(modules)
    ordered = [g for g in (*LOGICAL_GROUPS, ALL_LINEAR) if g in requested]
    return ordered + sorted(requested - set(ordered))


_LAYER_INDEX = re.compile(r"^.*?\.\d+\.")


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct linear layers with the per-layer prefix stripped ('self_attn.q_proj')."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    names = {
        _LAYER_INDEX.sub("", name) for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))
    }
    return sorted(names)


def _matches(target: str, layer_names: Iterable[str]) -> bool:
    # PEFT matches a list entry when the module's full name ends with it.
    return any(name == target or name.endswith("." + target) for name in layer_names)


def resolve_target_modules(model_type: str, requested: Sequence[str], layer_names: Sequence[str]) -> list[str] | str:
    """Map logical groups to this architecture's module names and check they exist.

    Returns PEFT's `target_modules`: a sorted name list, or "all-linear".
    """
    requested_set = set(requested)
    available = ", ".join(layer_names)
    if ALL_LINEAR in requested_set:
        if len(requested_set) > 1:
            raise ModuleResolutionError("'all-linear' cannot be combined with other modules")
        return ALL_LINEAR
    logical = [name for name in requested if name in LOGICAL_GROUPS]
    resolved: set[str] = {name for name in requested if name not in LOGICAL_GROUPS}
    if logical:
        arch = ARCHITECTURES.get(model_type)
        if arch is None:
            raise ModuleResolutionError(
                f"module groups {logical} are not defined for architecture '{model_type}'; "
                f"name the modules explicitly. Its linear layers: {available}"
            )
        for fused in arch.fused:
            part = set(fused) & set(logical)
            if part and part != set(fused):
                raise ModuleResolutionError(
                    f"{model_type} stores {', '.join(fused)} as one fused layer "
                    f"({arch.groups[fused[0]][0]}); request all of {list(fused)} or none"
                )
        for group in logical:
            resolved.update(arch.groups[group])
    missing = sorted(name for name in resolved if not _matches(name, layer_names))
    if missing:
        raise ModuleResolutionError(
            f"target modules {missing} not found in {model_type}; its linear layers: {available}"
        )
    return sorted(resolved)


def resolve_run_targets(
    run_id: str, modules: Sequence[str], layer_names: Sequence[str], model_type: str
) -> list[str] | str:
    """resolve_target_modules for one run; the error names the run."""
    try:
        return resolve_target_modules(model_type, modules, layer_names)
    except ModuleResolutionError as error:
        raise ModuleResolutionError(f"run '{run_id}': {error}") from None


def needs_fan_in_fan_out(model_type: str) -> bool:
    arch = ARCHITECTURES.get(model_type)
    return bool(arch and arch.fan_in_fan_out)


def meta_model(config) -> nn.Module:
    """The architecture on the meta device: names and shapes, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
