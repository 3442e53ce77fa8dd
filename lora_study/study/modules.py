"""Logical target-module groups (q, k, v, o, mlp, all-linear) per architecture family.

One `Layout` per naming convention, shared by the families that use it. Every
mapping is checked against the module names of a model built from its
transformers config (tests/test_modules.py). Nothing here imports torch at
module level: the workflow checks runs against a local model's config.json
while it is parsed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lora_study.core.errors import UserError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("lora_study")

# mixer: a hybrid model's token mixer other than attention (linear attention, state space, convolution).
LOGICAL_GROUPS: tuple[str, ...] = ("q", "k", "v", "o", "mlp", "mixer")
ALL_LINEAR = "all-linear"
# Order in which logical groups appear in run ids ("qkvo-mlp").
ATTENTION_GROUPS: tuple[str, ...] = ("q", "k", "v", "o")
OUTPUT_HEAD = "lm_head"


@dataclass(frozen=True)
class Layout:
    """Module names for each logical group under one naming convention."""

    name: str
    groups: dict[str, tuple[str, ...]]
    # Projections stored as one fused layer: requesting part of it is an error.
    fused: tuple[tuple[str, ...], ...] = ()
    # Conv1D layers (GPT-2) store weights transposed; PEFT needs to know.
    fan_in_fan_out: bool = False
    # Mixture of experts: 3-D expert weights the mlp group adapts through PEFT's target_parameters.
    expert_parameters: tuple[str, ...] = ()
    # Linear layers no group covers (routers' gates): still valid explicit targets.
    other_linear: tuple[str, ...] = ()
    # Multimodal checkpoints: only modules under this submodule (the language model) are targets.
    scope: str | None = None
    # Names (linear layers or 3-D expert weights) only some checkpoints of the family have: DeepSeek's q_proj
    # (no query compression) or q_a_proj, q_b_proj; Granite 4's experts (the dense hybrids have none).
    optional: tuple[str, ...] = ()
    notes: str = field(default="", compare=False)

    @property
    def peft_all_linear(self) -> bool:
        """Whether `all-linear` may be PEFT's own (every linear layer but the head). Not where that would reach
        into a vision tower, wrap an MoE router or a Mamba output projection PEFT refuses: there it means every
        group."""
        return not (self.scope or self.expert_parameters or "mixer" in self.groups)

    def declared_layers(self) -> list[str]:
        """Every per-layer linear name this layout knows (what a model of the family has)."""
        names = {name for modules in self.groups.values() for name in modules} | set(self.other_linear)
        return sorted(names)

    def for_model(self, layer_names: Sequence[str], expert_parameters: Sequence[str]) -> Layout:
        """This layout as one checkpoint has it: optional names the model lacks left out (never a required one,
        whose absence resolve_targets reports)."""
        if not self.optional:
            return self

        def present(name: str) -> bool:
            return name not in self.optional or _matches(name, layer_names) or name in expert_parameters

        groups = {group: tuple(filter(present, modules)) for group, modules in self.groups.items()}
        return replace(self, groups=groups, expert_parameters=tuple(filter(present, self.expert_parameters)),
                       optional=())  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "groups": {g: list(m) for g, m in self.groups.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        return cls(
            name=data["name"],
            groups={group: tuple(modules) for group, modules in data["groups"].items()},
            fused=tuple(tuple(part) for part in data.get("fused", ())),
            fan_in_fan_out=data.get("fan_in_fan_out", False),
            expert_parameters=tuple(data.get("expert_parameters", ())),
            other_linear=tuple(data.get("other_linear", ())),
            scope=data.get("scope"),
            optional=tuple(data.get("optional", ())),
            notes=data.get("notes", ""),
        )


_ATTENTION = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",)}
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")
_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_FUSED_QKV = (("q", "k", "v"),)


def _fused_attention(qkv: str, o: str) -> dict[str, tuple[str, ...]]:
    """q, k and v all name the one fused projection; requesting part of it is refused (Layout.fused)."""
    return {"q": (qkv,), "k": (qkv,), "v": (qkv,), "o": (o,)}


LLAMA = Layout("llama", {**_ATTENTION, "mlp": _GATED_MLP})
PHI = Layout(
    "phi",
    {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("dense",), "mlp": ("fc1", "fc2")},
    notes="attention output is `dense`; MLP is fc1, fc2",
)
PHI3 = Layout(
    "phi3",
    {**_fused_attention("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")},
    fused=_FUSED_QKV,
    notes="q, k, v fused in `qkv_proj`; gate and up fused in `gate_up_proj`",
)
GPT2 = Layout(
    "gpt2",
    {**_fused_attention("c_attn", "attn.c_proj"), "mlp": ("c_fc", "mlp.c_proj")},
    fused=_FUSED_QKV,
    fan_in_fan_out=True,
    notes="q, k, v fused in the Conv1D `c_attn`",
)
NEOX = Layout(
    "gpt_neox",
    {**_fused_attention("query_key_value", "dense"), "mlp": ("dense_h_to_4h", "dense_4h_to_h")},
    fused=_FUSED_QKV,
    notes="q, k, v fused in `query_key_value`",
)
GPTJ = Layout(
    "gptj",
    {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("out_proj",), "mlp": ("fc_in", "fc_out")},
)
GEMMA3_MULTIMODAL = Layout(
    "gemma3",
    {**_ATTENTION, "mlp": _GATED_MLP},
    scope="language_model",
    notes="language model only: the vision tower has its own q_proj, ..., fc1, fc2",
)
MOE = Layout(
    "moe",
    {**_ATTENTION, "mlp": ()},
    expert_parameters=_EXPERTS,
    notes="mlp = the experts' 3-D weights (PEFT target_parameters; needs lora_dropout 0; "
    "bitsandbytes leaves them unquantized)",
)
MOE_SHARED_EXPERT = Layout(
    "moe_shared_expert",
    {**_ATTENTION, "mlp": tuple(f"shared_expert.{name}" for name in _GATED_MLP)},
    expert_parameters=_EXPERTS,
    other_linear=("mlp.shared_expert_gate",),
    notes="mlp = the shared expert's linear layers and the experts' 3-D weights (as for moe)",
)

OPT = Layout("opt", {**_ATTENTION, "o": ("out_proj",), "mlp": ("fc1", "fc2")}, notes="attention output is `out_proj`")
STARCODER2 = Layout("starcoder2", {**_ATTENTION, "mlp": ("mlp.c_fc", "mlp.c_proj")}, notes="MLP is c_fc, c_proj")
GLM4 = Layout("glm4", {**_ATTENTION, "mlp": ("gate_up_proj", "down_proj")}, notes="gate and up fused in `gate_up_proj`")
MOE_LINEAR_ROUTER = Layout(
    "moe_linear_router",
    {**_ATTENTION, "mlp": ()},
    expert_parameters=_EXPERTS,
    other_linear=("mlp.router",),
    notes="mlp = the experts' 3-D weights (as for moe); the router, a linear layer, is left alone",
)
_LLAMA4_DENSE_MLP = tuple(f"feed_forward.{name}" for name in _GATED_MLP)
LLAMA4_TEXT = Layout(
    "llama4_text",
    {
        **_ATTENTION,
        "mlp": (*(f"feed_forward.shared_expert.{name}" for name in _GATED_MLP), *_LLAMA4_DENSE_MLP),
    },
    expert_parameters=("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),
    other_linear=("feed_forward.router",),
    optional=_LLAMA4_DENSE_MLP,
    notes="mlp = the shared expert and the experts' 3-D weights, and the dense layers' MLP where the checkpoint "
    "interleaves dense and MoE layers (Maverick: interleave_moe_layer_step 2)",
)

# Hybrids: attention projections exist only in the full-attention layers (q, k, v, o reach those), the other
# layers mix tokens by gated linear attention (mixer).
QWEN3_5 = Layout(
    "qwen3_5",
    {
        **_ATTENTION,
        "mlp": _GATED_MLP,
        "mixer": tuple(
            f"linear_attn.{name}" for name in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
        ),
    },
    notes="hybrid: q, k, v, o in the full-attention layers only; mixer = the gated linear-attention layers' "
    "projections",
)
QWEN3_NEXT = Layout(
    "qwen3_next",
    {
        **_ATTENTION,
        "mlp": tuple(f"shared_expert.{name}" for name in _GATED_MLP),
        "mixer": tuple(f"linear_attn.{name}" for name in ("in_proj_qkvz", "in_proj_ba", "out_proj")),
    },
    expert_parameters=_EXPERTS,
    other_linear=("mlp.shared_expert_gate",),
    notes="hybrid MoE: q, k, v, o in the full-attention layers only; mixer = the linear-attention layers' "
    "projections; mlp = the shared expert and the experts' 3-D weights",
)
# Multi-head latent attention: queries and keys/values pass through low-rank projections. q = q_a_proj and
# q_b_proj; k and v share kv_a_proj_with_mqa (compressed kv and the rotary key) and kv_b_proj (keys and values
# from it), so they are one fused pair; o = o_proj: the modules PEFT users target for these models.
DEEPSEEK = Layout(
    "deepseek",
    {
        "q": ("q_proj", "q_a_proj", "q_b_proj"),
        "k": ("kv_a_proj_with_mqa", "kv_b_proj"),
        "v": ("kv_a_proj_with_mqa", "kv_b_proj"),
        "o": ("o_proj",),
        "mlp": (*_GATED_MLP, *(f"shared_experts.{name}" for name in _GATED_MLP)),
    },
    fused=(("k", "v"),),
    expert_parameters=_EXPERTS,
    optional=("q_proj", "q_a_proj", "q_b_proj"),
    notes="MLA: q = q_a_proj, q_b_proj (q_proj where the checkpoint has no query compression: V2-Lite); k and v "
    "share kv_a_proj_with_mqa, kv_b_proj (request both or neither); mlp = the dense layers' MLP, the shared "
    "experts and the experts' 3-D weights",
)

LFM2 = Layout(
    "lfm2",
    {
        "q": ("self_attn.q_proj",),
        "k": ("self_attn.k_proj",),
        "v": ("self_attn.v_proj",),
        "o": ("self_attn.out_proj",),
        "mlp": ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
        "mixer": ("conv.in_proj", "conv.out_proj"),
    },
    notes="hybrid: q, k, v, o in the attention layers only; mixer = the short-convolution layers' projections",
)
FALCON_H1 = Layout(
    "falcon_h1",
    {
        **_ATTENTION,
        "mlp": tuple(f"feed_forward.{name}" for name in _GATED_MLP),
        "mixer": ("mamba.in_proj",),
    },
    other_linear=("mamba.out_proj",),
    notes="parallel hybrid: attention and a Mamba-2 mixer in every layer; mixer = the Mamba input projection "
    "(PEFT refuses LoRA on its out_proj)",
)
JAMBA = Layout(
    "jamba",
    {
        **_ATTENTION,
        "mlp": tuple(f"feed_forward.{name}" for name in _GATED_MLP),
        "mixer": tuple(f"mamba.{name}" for name in ("in_proj", "x_proj", "out_proj")),
    },
    expert_parameters=("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),
    other_linear=("mamba.dt_proj",),
    notes="hybrid MoE: q, k, v, o in the attention layers only; mixer = the Mamba layers' in_proj, x_proj, "
    "out_proj (the Mamba forward reads dt_proj's weight directly: LoRA there would train nothing); mlp = the "
    "dense MLPs and the experts' 3-D weights",
)

GRANITE_HYBRID = Layout(
    "granitemoehybrid",
    {
        **_ATTENTION,
        "mlp": ("shared_mlp.input_linear", "shared_mlp.output_linear"),
        "mixer": ("mamba.in_proj",),
    },
    expert_parameters=("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"),
    other_linear=("mamba.out_proj",),
    optional=("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"),
    notes="hybrid: q, k, v, o in the attention layers only; mixer = the Mamba-2 input projection (with the "
    "mamba_ssm kernels the Mamba forward reads out_proj's weight directly: LoRA there would train nothing); mlp = "
    "the shared MLP and, in the MoE checkpoints, the experts' 3-D weights",
)
MPT = Layout(
    "mpt",
    {**_fused_attention("attn.Wqkv", "attn.out_proj"), "mlp": ("ffn.up_proj", "ffn.down_proj")},
    fused=_FUSED_QKV,
    notes="q, k, v fused in `Wqkv`",
)

# transformers' model_type -> layout. Verified against models built from each config.
LLAMA_LIKE_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo",
    "olmo2",
    "granite",
    "stablelm",
    "cohere2",
    "smollm3",
    "exaone4",
    "seed_oss",
)
ARCHITECTURES: dict[str, Layout] = {
    **dict.fromkeys(LLAMA_LIKE_TYPES, LLAMA),
    "phi": PHI,
    "phi3": PHI3,
    "gpt2": GPT2,
    "gpt_neox": NEOX,
    "falcon": NEOX,
    "gptj": GPTJ,
    "gemma3": GEMMA3_MULTIMODAL,
    "mixtral": MOE,
    "qwen3_moe": MOE,
    "qwen2_moe": MOE_SHARED_EXPERT,
    "opt": OPT,
    "bloom": NEOX,
    "starcoder2": STARCODER2,
    "glm4": GLM4,
    "olmoe": MOE,
    "phimoe": MOE_LINEAR_ROUTER,
    "llama4_text": LLAMA4_TEXT,
    "qwen3_5": QWEN3_5,
    "qwen3_5_text": QWEN3_5,
    "qwen3_next": QWEN3_NEXT,
    "lfm2": LFM2,
    "falcon_h1": FALCON_H1,
    "jamba": JAMBA,
    "deepseek_v2": DEEPSEEK,
    "deepseek_v3": DEEPSEEK,
    "granitemoehybrid": GRANITE_HYBRID,
    "gpt_oss": MOE,
    "mpt": MPT,
}
# Who ships each model_type, for the family table in docs/configuration.md.
FAMILY_NAMES: dict[str, str] = {
    "llama": "Llama 2/3, SmolLM2",
    "mistral": "Mistral",
    "qwen2": "Qwen 2 / 2.5",
    "qwen3": "Qwen 3",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text-only checkpoints)",
    "gemma3": "Gemma 3 (multimodal checkpoints)",
    "olmo": "OLMo",
    "olmo2": "OLMo 2",
    "granite": "Granite",
    "stablelm": "StableLM",
    "phi": "Phi-1.5, Phi-2",
    "phi3": "Phi-3, Phi-3.5, Phi-4",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX, Pythia",
    "falcon": "Falcon",
    "gptj": "GPT-J",
    "mixtral": "Mixtral (MoE)",
    "qwen3_moe": "Qwen 3 MoE",
    "qwen2_moe": "Qwen 1.5 / 2 MoE",
    "cohere2": "Command R7B (Cohere 2)",
    "smollm3": "SmolLM3",
    "exaone4": "EXAONE 4",
    "seed_oss": "Seed-OSS",
    "opt": "OPT",
    "bloom": "BLOOM",
    "starcoder2": "StarCoder2",
    "glm4": "GLM-4",
    "olmoe": "OLMoE",
    "phimoe": "Phi-3.5-MoE",
    "llama4_text": "Llama 4 (text)",
    "qwen3_5": "Qwen3.5",
    "qwen3_5_text": "Qwen3.5 (text-only checkpoints)",
    "qwen3_next": "Qwen3-Next",
    "lfm2": "LFM2",
    "falcon_h1": "Falcon-H1",
    "jamba": "Jamba",
    "deepseek_v2": "DeepSeek-V2, V2-Lite (MLA)",
    "deepseek_v3": "DeepSeek-V3, R1, Kimi K2 (MLA)",
    "granitemoehybrid": "Granite 4 (hybrid)",
    "gpt_oss": "gpt-oss",
    "mpt": "MPT",
}
# Layouts an unknown family's groups are inferred from (MoE and scoped ones need more than names).
_INFERABLE = (LLAMA, PHI, PHI3, GPT2, NEOX, GPTJ)


class ModuleResolutionError(UserError):
    """Requested target modules do not exist in the model."""


@dataclass(frozen=True)
class Targets:
    """What LoRA adapts in one run, as PEFT's LoraConfig takes it."""

    modules: list[str] | str  # names (suffix-matched), a regex (scoped layouts) or "all-linear"
    parameters: tuple[str, ...] = ()  # 3-D expert weights (target_parameters)
    fan_in_fan_out: bool = False

    def lora_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"target_modules": self.modules, "fan_in_fan_out": self.fan_in_fan_out}
        if self.parameters:
            kwargs["target_parameters"] = list(self.parameters)
        return kwargs

    def key(self) -> tuple[Any, ...]:
        """Hashable identity (planner caches)."""
        modules = self.modules if isinstance(self.modules, str) else tuple(self.modules)
        return (modules, self.parameters, self.fan_in_fan_out)

    def describe(self) -> str:
        parts = [self.modules if isinstance(self.modules, str) else ", ".join(self.modules)]
        if self.parameters:
            parts.append(f"expert parameters {', '.join(self.parameters)}")
        return "; ".join(part for part in parts if part)


def modules_label(modules: Sequence[str]) -> str:
    """Short, stable label for run ids: [q,k,v,o,mlp] -> 'qkvo-mlp'."""
    requested = set(modules)
    if requested == {ALL_LINEAR}:
        return "all"
    attention = "".join(g for g in ATTENTION_GROUPS if g in requested)
    parts = [attention] if attention else []
    parts += [group for group in ("mlp", "mixer") if group in requested]
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


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Distinct 3-D weights of mixture-of-experts blocks, per-layer prefix stripped ('mlp.experts.down_proj'):
    parameters of modules that are not convolutions (a convolution's kernel is 3-D too), one matrix per expert
    (RWKV's (1, 1, hidden) token-mixing vectors are 3-D as well, and no experts)."""
    from torch import nn

    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and min(param.shape) > 1:
                names.add(_LAYER_INDEX.sub("", f"{module_name}.{name}"))
    return sorted(names)


def names_match(name: str, target: str) -> bool:
    """Whether a target-module entry designates the module `name`: PEFT matches a list entry when the module's
    full name is it or ends with '.' + it."""
    return name == target or name.endswith("." + target)


def _matches(target: str, layer_names: Iterable[str]) -> bool:
    return any(names_match(name, target) for name in layer_names)


def infer_layout(layer_names: Sequence[str], expert_parameters: Sequence[str] = ()) -> Layout | None:
    """Groups of an unknown family from standard names, each only where exactly one convention fits, and its
    mixture-of-experts weights (3-D parameters, `expert_parameters`) as the mlp group's, adapted through PEFT's
    target_parameters (as for the known MoE families).

    None when not even q, k and v can be placed.
    """
    groups: dict[str, tuple[str, ...]] = {}
    fused: set[tuple[str, ...]] = set()
    fan_in_fan_out = False
    for group in LOGICAL_GROUPS:
        fitting = {layout.groups.get(group, ()) for layout in _INFERABLE
                   if _all_present(layout.groups.get(group, ()), layer_names)}  # fmt: skip
        if len(fitting) != 1:
            continue
        (groups[group],) = fitting
        for layout in _INFERABLE:
            if layout.groups.get(group) == groups[group]:
                fused.update(part for part in layout.fused if group in part)
                fan_in_fan_out |= layout.fan_in_fan_out
    if not {"q", "k", "v"} <= set(groups):
        return None
    if expert_parameters:
        groups.setdefault("mlp", ())
    return Layout("inferred", groups, tuple(sorted(fused)), fan_in_fan_out, expert_parameters=tuple(expert_parameters),
                  notes="inferred from module names")  # fmt: skip


def _all_present(names: Sequence[str], layer_names: Sequence[str]) -> bool:
    return bool(names) and all(_matches(name, layer_names) for name in names)


def layout_for(
    model_type: str, layer_names: Sequence[str] | None = None, expert_parameters: Sequence[str] = ()
) -> tuple[Layout | None, str]:
    """(layout, how it was found: 'known', 'inferred' or 'none')."""
    if model_type in ARCHITECTURES:
        layout = ARCHITECTURES[model_type]
        return (layout if layer_names is None else layout.for_model(layer_names, expert_parameters)), "known"
    inferred = infer_layout(layer_names or [], expert_parameters)
    if inferred is None:
        return None, "none"
    log.info("model type '%s' is not a known family; groups inferred from its module names: %s", model_type,
             inferred.groups)  # fmt: skip
    return inferred, "inferred"


def describe_layout(
    model_type: str, layer_names: Sequence[str], expert_parameters: Sequence[str] = ()
) -> dict[str, Any]:
    """The manifest's record of how groups map to modules for this model."""
    layout, source = layout_for(model_type, layer_names, expert_parameters)
    return {"source": source, **(layout.to_dict() if layout else {})}


def manifest_layout(manifest: dict[str, Any]) -> Layout | None:
    """The layout the manifest recorded (older manifests: looked up again)."""
    recorded = manifest.get("module_layout")
    if recorded is None:
        return layout_for(manifest["model_type"], manifest["linear_layers"], manifest.get("expert_parameters", ()))[0]
    return Layout.from_dict(recorded) if recorded["source"] != "none" else None


def resolve_targets(
    layout: Layout | None,
    requested: Sequence[str],
    layer_names: Sequence[str],
    model_type: str,
    lora_dropout: float = 0.0,
) -> Targets:
    """Map logical groups to the layout's module names and check they exist in `layer_names`."""
    requested_set = set(requested)
    available = ", ".join(layer_names)
    if ALL_LINEAR in requested_set and len(requested_set) > 1:
        raise ModuleResolutionError("'all-linear' cannot be combined with other modules")
    if ALL_LINEAR in requested_set:
        # PEFT's all-linear would reach into a vision tower or wrap an MoE router: there, every group instead.
        if layout is None or layout.peft_all_linear:
            _refuse_mamba_outputs(model_type, [n for n in layer_names if not names_match(n, OUTPUT_HEAD)], ALL_LINEAR)
            return Targets(ALL_LINEAR, fan_in_fan_out=bool(layout and layout.fan_in_fan_out))
        requested = [group for group in LOGICAL_GROUPS if group in layout.groups]
    logical = [name for name in requested if name in LOGICAL_GROUPS]
    names: set[str] = {name for name in requested if name not in LOGICAL_GROUPS}
    parameters: tuple[str, ...] = ()
    if logical:
        if layout is None:
            raise ModuleResolutionError(
                f"module groups {logical} are not defined for architecture '{model_type}' and cannot be inferred "
                f"from its module names; name the modules explicitly. Its linear layers: {available}"
            )
        _check_fused(layout, logical, model_type)
        unplaced = [group for group in logical if group not in layout.groups]
        if unplaced:
            raise ModuleResolutionError(
                f"module groups {unplaced} could not be placed in {model_type} ({layout.notes or layout.name}: "
                f"{', '.join(f'{g}={list(m)}' for g, m in layout.groups.items())}); name the modules explicitly. "
                f"Its linear layers: {available}"
            )
        for group in logical:
            names.update(layout.groups[group])
        if "mlp" in logical and layout.expert_parameters:
            parameters = layout.expert_parameters
            _check_expert_settings(model_type, lora_dropout)
    missing = sorted(name for name in names if not _matches(name, layer_names))
    if missing:
        raise ModuleResolutionError(
            f"target modules {missing} not found in {model_type}; its linear layers: {available}"
        )
    _refuse_mamba_outputs(model_type, [n for n in layer_names if any(names_match(n, t) for t in names)], requested)
    modules: list[str] | str = sorted(names)
    if layout is not None and layout.scope:
        modules = scoped_pattern(layout.scope, sorted(names))
    return Targets(modules, parameters, bool(layout and layout.fan_in_fan_out))


# PEFT refuses LoRA on these layers of Mamba-based models (peft.tuners.tuners_utils._check_lora_target_modules_mamba).
PEFT_MAMBA_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
PEFT_MAMBA_REFUSED = frozenset({"out_proj", "conv1d"})


def _refuse_mamba_outputs(model_type: str, targeted: Sequence[str], requested: Sequence[str] | str) -> None:
    """A request that would reach a layer PEFT refuses on a Mamba-based model, as one line before any load."""
    refused = sorted(name for name in targeted if name.rsplit(".", 1)[-1] in PEFT_MAMBA_REFUSED)
    if model_type in PEFT_MAMBA_TYPES and refused:
        raise ModuleResolutionError(
            f"{list(requested) if not isinstance(requested, str) else requested} reaches {refused}, which PEFT "
            f"refuses to adapt in Mamba-based models ({model_type}); name the other modules explicitly"
        )


def _check_fused(layout: Layout, logical: Sequence[str], model_type: str) -> None:
    for fused in layout.fused:
        part = set(fused) & set(logical)
        if part and part != set(fused):
            raise ModuleResolutionError(
                f"{model_type} stores {', '.join(fused)} as one fused layer "
                f"({layout.groups[fused[0]][0]}); request all of {list(fused)} or none"
            )


def _check_expert_settings(model_type: str, lora_dropout: float) -> None:
    # PEFT's ParamWrapper cannot factor dropout out of the expert matmul.
    if lora_dropout:
        raise ModuleResolutionError(
            f"{model_type}'s mlp is a mixture of experts stored as 3-D weights, which PEFT adapts only with "
            f"lora_dropout 0 (this run has {lora_dropout}); set training.lora_dropout: 0 or leave out 'mlp'"
        )


def scoped_pattern(scope: str, names: Sequence[str]) -> str:
    """PEFT regex (full match on the module's name) for `names` under the `scope` submodule only."""
    alternatives = "|".join(re.escape(name) for name in names)
    return rf"(?:.*\.)?{re.escape(scope)}\..*\.(?:{alternatives})"


def resolve_run_targets(
    run_id: str,
    modules: Sequence[str],
    layout: Layout | None,
    layer_names: Sequence[str],
    model_type: str,
    lora_dropout: float = 0.0,
) -> Targets:
    """resolve_targets for one run; the error names the run."""
    try:
        return resolve_targets(layout, modules, layer_names, model_type, lora_dropout)
    except ModuleResolutionError as error:
        raise ModuleResolutionError(f"run '{run_id}': {error}") from None


_LAYER_NUMBER = re.compile(r"\.(\d+)\.")
_PEFT_WRAPPER = re.compile(r"(\.base_layer)+")


def _unwrapped(name: str) -> str:
    """A module's name in the model, without PEFT's base_layer wrappers."""
    return _PEFT_WRAPPER.sub("", name)


def peft_wrapped(peft_model: nn.Module) -> dict[str, set[int]]:
    """What PEFT wrapped: per-layer name ('self_attn.q_proj', 'mlp.experts.down_proj' for a 3-D weight) -> the
    indices of the decoder layers where it did (-1 for a module outside the numbered layers)."""
    wrapped: dict[str, set[int]] = {}
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and len(module.lora_A)):
            continue
        name = _unwrapped(name)
        if type(module).__name__ == "ParamWrapper":  # a 3-D weight adapted through target_parameters
            name = f"{name}.{module.parameter_name}"
        index = _LAYER_NUMBER.search(name)
        wrapped.setdefault(_LAYER_INDEX.sub("", name), set()).add(int(index.group(1)) if index else -1)
    return wrapped


_ROUTED_EXPERT = re.compile(r"\.experts?\.\d+\.")


def adapters_without_gradient(model: nn.Module) -> list[str]:
    """Per-layer names of the wrapped layers whose adapter got no gradient from a backward pass: the model reads
    those layers' weights directly (Jamba's Mamba dt_proj on its reference path), so LoRA there trains nothing.
    Experts kept as separate linear layers are left out: the batch may route no token to one."""
    names = set()
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" in name and param.grad is None and not _ROUTED_EXPERT.search(name):
            layer = re.sub(r"\.lora_\w+(\.\w+)*$", "", name)
            names.add(_LAYER_INDEX.sub("", _unwrapped(layer)))
    return sorted(names)


def group_coverage(
    layout: Layout | None, requested: Sequence[str], wrapped: dict[str, set[int]], num_layers: int
) -> dict[str, dict[str, Any]]:
    """Per requested group (a logical group, an explicit name or all-linear): the wrapped names it stands for
    and in how many of the `num_layers` decoder layers any of them was wrapped."""
    coverage = {}
    for group in canonical_modules(requested):
        if group == ALL_LINEAR:
            names = sorted(wrapped)
        else:
            wanted = (layout.groups.get(group, ()) if layout else ()) if group in LOGICAL_GROUPS else (group,)
            if group == "mlp" and layout is not None:
                wanted = (*wanted, *layout.expert_parameters)
            names = sorted(n for n in wrapped if any(names_match(n, w) for w in wanted))
        layers = set().union(*(wrapped[n] for n in names)) - {-1} if names else set()
        coverage[group] = {"modules": names, "layers": len(layers), "of": num_layers}
    return coverage


def check_coverage(coverage: dict[str, dict[str, Any]], model_type: str) -> list[str]:
    """Refuse a requested group that wrapped nothing (an error, naming it); return one line per group that
    reached only some layers (a hybrid model's attention groups), for the log and the report."""
    empty = [group for group, found in coverage.items() if not found["modules"]]
    if empty:
        raise ModuleResolutionError(
            f"module groups {empty} wrapped nothing in {model_type} after PEFT applied the targets; name the "
            "modules explicitly"
        )
    return [f"{group}: {found['layers']} of {found['of']} layers" for group, found in coverage.items()
            if 0 < found["layers"] < found["of"]]  # fmt: skip


@contextmanager
def targets_as_given() -> Iterator[None]:
    """PEFT rewrites the targets of the MoE families whose layout changed in transformers 5, so adapters trained
    on transformers 4 still load: every target named gate_proj, up_proj or down_proj becomes the fused experts'
    weight, and with it DeepSeek-V3's dense-layer MLP and shared experts silently drop out. The study's targets
    are in transformers-5 terms already (experts through target_parameters), so the rewrite is off while PEFT
    builds or loads one of its adapters."""
    from peft.utils import transformers_weight_conversion as conversion

    rewrite = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = rewrite


def meta_model(config) -> nn.Module:
    """The architecture on the meta device: names and shapes, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def families_table() -> str:
    """The table of supported families in docs/configuration.md and their group mapping (kept in sync by a test)."""
    lines = [
        "| family | model_type | q | k | v | o | mlp | mixer | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model_type, layout in ARCHITECTURES.items():
        cells = []
        for group in LOGICAL_GROUPS:
            modules = list(layout.groups.get(group, ()))
            if group == "mlp":
                modules += [f"{name} (3-D)" for name in layout.expert_parameters]
            cells.append(", ".join(f"`{name}`" for name in modules))
        lines.append(f"| {FAMILY_NAMES[model_type]} | `{model_type}` | {' | '.join(cells)} | {layout.notes} |")
    return "\n".join(lines)


# Attention implementation: `auto` takes what transformers supports for the model.
ATTENTION_AUTO = "auto"
FUSED_ATTENTION = ("sdpa", "flash_attention_2")


def attention_support(model_class: type) -> dict[str, bool]:
    """Which fused attention kernels transformers implements for this model class (eager always works)."""
    return {
        "sdpa": bool(getattr(model_class, "_supports_sdpa", False)),
        "flash_attention_2": bool(getattr(model_class, "_supports_flash_attn", False)),
    }


def resolve_attention(manifest: dict[str, Any], requested: str) -> str:
    """`auto` -> SDPA where the model supports it, else eager; an explicit choice stays as it is.

    Manifests written before attention support was recorded assume SDPA (what was hard-coded then).
    """
    if requested != ATTENTION_AUTO:
        return requested
    return "sdpa" if manifest.get("attention_support", {"sdpa": True})["sdpa"] else "eager"


def attention_problem(manifest: dict[str, Any], requested: str) -> str | None:
    """Why the model cannot run the requested implementation, or None."""
    support = manifest.get("attention_support")
    if requested in FUSED_ATTENTION and support is not None and not support[requested]:
        return (
            f"{manifest['model_type']} does not support attn_implementation '{requested}' in transformers; "
            "set training.attn_implementation: auto (or eager)"
        )
    return None


if __name__ == "__main__":  # python -m lora_study.study.modules: the family table of docs/configuration.md
    print(families_table())
