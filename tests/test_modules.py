"""Module groups resolved on real models built from each family's transformers config (no download).

Each family's mapping is checked against the module names of a model built
from its config, and PEFT itself says which layers (and expert weights) the
resolved targets wrap.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import run_snakemake, tiny_study_config
from lora_study.study.config import validate_config
from lora_study.study.modules import (
    ARCHITECTURES,
    LOGICAL_GROUPS,
    ModuleResolutionError,
    adapters_without_gradient,
    check_coverage,
    describe_layout,
    expert_parameter_names,
    families_table,
    group_coverage,
    infer_layout,
    layout_for,
    linear_layer_names,
    modules_label,
    names_match,
    peft_wrapped,
    resolve_targets,
    targets_as_given,
)
from lora_study.study.sweep import expand_study

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=32)  # fmt: skip
# A hybrid: three gated linear-attention layers, then one full-attention layer.
QWEN3_5_HYBRID = {**TINY, "num_key_value_heads": 2, "num_hidden_layers": 4, "linear_num_key_heads": 2,
                  "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                  "layer_types": ["linear_attention"] * 3 + ["full_attention"]}  # fmt: skip
# Multi-head latent attention (DeepSeek-V2/V3): low-rank kv, one dense layer, then MoE layers.
LLAMA4_DENSE = ("gate_proj", "up_proj", "down_proj")
MLA = {**TINY, "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
       "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "first_k_dense_replace": 1,
       "n_group": 1, "topk_group": 1}  # fmt: skip
# Settings a family's config needs beyond TINY (its own names for sizes, experts, a vision tower).
FAMILY_SETTINGS = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, rotary_dim=8),
    "falcon": TINY,
    "gpt_neox": TINY,
    "phi": TINY,
    "mixtral": {**TINY, "num_key_value_heads": 2, **MOE},
    "qwen2_moe": {**TINY, "num_key_value_heads": 2, **MOE},
    "qwen3_moe": {**TINY, "num_key_value_heads": 2, **MOE},
    "olmoe": {**TINY, "num_key_value_heads": 2, **MOE},
    "lfm2": {
        **TINY,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "layer_types": ["conv", "conv", "full_attention", "conv"],
    },
    "falcon_h1": {
        **TINY,
        "num_key_value_heads": 2,
        "mamba_d_ssm": 64,
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 16,
        "mamba_n_groups": 1,
    },
    "jamba": {
        **TINY,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "mamba_d_state": 8,
        "mamba_expand": 2,
        "mamba_dt_rank": 8,
    },
    "phimoe": {**TINY, "num_key_value_heads": 2, **MOE},
    "llama4_text": {
        **TINY,
        "num_key_value_heads": 2,
        **MOE,
        "num_experts_per_tok": 1,
        "intermediate_size_mlp": 128,
        "interleave_moe_layer_step": 1,
    },
    # Multi-head latent attention with query compression, one dense layer then MoE layers.
    "deepseek_v3": {**MLA, "q_lora_rank": 16},
    "qwen3_next": {
        **QWEN3_5_HYBRID,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    },
    "qwen3_5_text": QWEN3_5_HYBRID,
    # DeepSeek-V2-Lite's shape: no query compression (q_proj), shared experts.
    "deepseek_v2": {**MLA, "q_lora_rank": None, "n_shared_experts": 1},
    # Granite 4 hybrid MoE: a Mamba-2 layer, then an attention layer; experts and a shared MLP in each.
    "granitemoehybrid": {
        **TINY,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "shared_intermediate_size": 64,
        "layer_types": ["mamba", "attention"],
        "mamba_n_heads": 4,
        "mamba_d_head": 32,
        "mamba_d_state": 16,
        "mamba_n_groups": 1,
        "mamba_expand": 2,
    },
    "mpt": dict(d_model=64, n_heads=4, n_layers=2, vocab_size=256, expansion_ratio=2),
    "mamba": dict(hidden_size=64, state_size=16, num_hidden_layers=2, expand=2, vocab_size=256),
    "rwkv": dict(hidden_size=64, attention_hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=256),
    "qwen3_5": {"text_config": QWEN3_5_HYBRID},
    "gemma3": dict(
        text_config={**TINY, "num_key_value_heads": 2, "head_dim": 16},
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
    ),
}


def tiny_config(model_type: str, **overrides):
    settings = FAMILY_SETTINGS.get(model_type, {**TINY, "num_key_value_heads": 2})
    return AutoConfig.for_model(model_type, **{**settings, **overrides})


def build(model_type: str, device: str = "meta", **overrides) -> torch.nn.Module:
    with torch.device(device):
        return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))


def model_layout(model_type: str, model: torch.nn.Module):
    """The family's layout as this checkpoint has it (what the manifest records)."""
    return layout_for(model_type, linear_layer_names(model), expert_parameter_names(model))[0]


def strip_layer(name: str) -> str:
    return re.sub(r"^.*?\.\d+\.", "", name)


def targeted_layers(model: torch.nn.Module, scope: str | None = None) -> set[str]:
    """Per-layer names of the linear layers (under `scope`) a model has, output head excluded."""
    head = model.get_output_embeddings()
    return {
        strip_layer(name)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        if module is not head and (scope is None or f".{scope}." in f".{name}")
    }


def wrapped(model: torch.nn.Module, targets) -> tuple[set[str], set[str]]:
    """(linear layers, 3-D parameters) PEFT wrapped for `targets`, by per-layer name."""
    with targets_as_given():
        peft_model = get_peft_model(model, LoraConfig(r=2, **targets.lora_kwargs()))
    layers, parameters = set(), set()
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and len(module.lora_A)):
            continue
        if type(module).__name__ == "ParamWrapper":
            parameters.add(strip_layer(name).removesuffix(".base_layer") + "." + module.parameter_name)
        else:
            layers.add(strip_layer(name.replace(".base_layer", "")))
    return layers, {re.sub(r"(\.base_layer)+", "", p) for p in parameters}


def expected_layers(layout, groups, names) -> set[str]:
    """The model's per-layer names that the layout's modules for `groups` designate."""
    wanted = {module for group in groups for module in layout.groups[group]}
    return {name for name in names if any(names_match(name, w) for w in wanted)}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_layout_names_exactly_the_models_linear_layers(model_type):
    """Every name the layout declares exists, and every linear layer of the body is declared."""
    model = build(model_type)
    layout = model_layout(model_type, model)
    names = targeted_layers(model, layout.scope)
    declared = layout.declared_layers()
    assert all(any(names_match(n, d) for n in names) for d in declared), (declared, names)
    assert all(any(names_match(n, d) for d in declared) for n in names), (declared, names)
    experts = {n for n in expert_parameter_names(model) if "vision" not in n}
    assert experts == set(layout.expert_parameters)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize("groups", [["q", "k", "v", "o"], ["o"], ["mlp"], ["q", "k", "v", "o", "mlp"], ["all-linear"]])
def test_groups_wrap_exactly_the_right_layers(model_type, groups):
    model = build(model_type)
    layout = model_layout(model_type, model)
    names = targeted_layers(model, layout.scope)
    targets = resolve_targets(layout, groups, linear_layer_names(model), model_type)
    layers, parameters = wrapped(model, targets)
    logical = [g for g in LOGICAL_GROUPS if g in layout.groups] if groups == ["all-linear"] else groups
    if groups == ["all-linear"] and layout.peft_all_linear:
        assert layers == names  # PEFT's own all-linear: every linear layer but the head
    else:
        assert layers == expected_layers(layout, logical, names)
    assert parameters == (set(layout.expert_parameters) if "mlp" in logical else set())
    if layout.scope:  # a multimodal checkpoint: nothing in the vision tower
        peft_names = [n for n, _ in get_peft_model(build(model_type), LoraConfig(r=2, **targets.lora_kwargs()))
                      .named_modules() if n.endswith("lora_A")]  # fmt: skip
        assert peft_names and all(".language_model." in n for n in peft_names)


@pytest.mark.parametrize(
    "model_type", sorted(t for t, layout in ARCHITECTURES.items() if ("q", "k", "v") in layout.fused)
)
@pytest.mark.parametrize("part", [["q"], ["q", "v"], ["k", "v", "o"]])
def test_part_of_a_fused_projection_is_refused(model_type, part):
    model = build(model_type)
    with pytest.raises(ModuleResolutionError, match=r"stores q, k, v as one fused layer .*request all of"):
        resolve_targets(ARCHITECTURES[model_type], part, linear_layer_names(model), model_type)


def test_fused_families_include_phi3_neox_falcon_gpt2():
    fused = {t for t, layout in ARCHITECTURES.items() if layout.fused}
    assert {"phi3", "gpt_neox", "falcon", "gpt2"} <= fused


def test_experts_need_lora_dropout_zero():
    layout = ARCHITECTURES["mixtral"]
    names = linear_layer_names(build("mixtral"))
    with pytest.raises(ModuleResolutionError, match=r"mixture of experts .*lora_dropout 0 \(this run has 0.05\)"):
        resolve_targets(layout, ["q", "v", "mlp"], names, "mixtral", lora_dropout=0.05)
    assert resolve_targets(layout, ["q", "v"], names, "mixtral", lora_dropout=0.05).parameters == ()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_family_trains_every_adapter_it_wrapped(model_type):
    """A real (CPU, fp32, random) model of each family with LoRA on all-linear: one forward and backward reaches
    every adapter PEFT added (expert weights, mixers and attention alike), so each wrapped name can train."""
    torch.manual_seed(0)
    model = build(model_type, "cpu")
    targets = resolve_targets(model_layout(model_type, model), ["all-linear"], linear_layer_names(model), model_type)
    with targets_as_given():
        peft_model = get_peft_model(model, LoraConfig(r=2, init_lora_weights=False, **targets.lora_kwargs()))
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    ids = torch.randint(3, 256, (2, 8))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_an_adapter_the_forward_never_uses_is_found():
    """Jamba's Mamba forward multiplies by dt_proj.weight itself: PEFT wraps dt_proj, its adapter never enters
    the computation, and the run would report it as trained. The layout leaves it out of mixer; asked for by
    name, the first backward shows it (the training loop refuses the run then)."""
    torch.manual_seed(0)
    model = build("jamba", "cpu")
    names = linear_layer_names(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, init_lora_weights=False, **resolve_targets(
        None, ["mamba.dt_proj", "mamba.in_proj"], names, "jamba").lora_kwargs()))  # fmt: skip
    ids = torch.randint(3, 256, (2, 8))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert adapters_without_gradient(peft_model) == ["mamba.dt_proj"]
    assert "mamba.dt_proj" not in ARCHITECTURES["jamba"].groups["mixer"]


def test_unknown_family_groups_are_inferred_from_standard_names():
    """OPT is not in the table: its q_proj, k_proj, v_proj, out_proj, fc1, fc2 place every group."""
    model = build("opt")
    names = linear_layer_names(model)
    layout, source = layout_for("unknown_opt", names)  # as if OPT were not in the table
    assert source == "inferred"
    assert describe_layout("unknown_opt", names)["source"] == "inferred"  # what the manifest records
    assert layout.groups == {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("out_proj",),
                             "mlp": ("fc1", "fc2")}  # fmt: skip
    layers, _ = wrapped(model, resolve_targets(layout, ["q", "v", "mlp"], names, "unknown_opt"))
    assert layers == {"self_attn.q_proj", "self_attn.v_proj", "fc1", "fc2"}


@pytest.mark.parametrize(("model_type", "how", "experts"), [
    ("gpt_oss", "known", ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]),
    ("granitemoe", "inferred", ["block_sparse_moe.experts.down_proj", "block_sparse_moe.experts.gate_up_proj"]),
])  # fmt: skip
def test_all_linear_reaches_the_experts_of_a_parameter_moe(model_type, how, experts):
    """gpt-oss keeps its experts as 3-D parameters: PEFT's own all-linear would wrap the four attention
    projections only (the same adapter as q,k,v,o, silently; it did before gpt-oss was mapped). Mapped, and for a
    family not in the table (Granite MoE) inferred, the layout carries the experts, so all-linear and mlp adapt
    them, and the two requests train different things."""
    model = build(model_type, num_local_experts=4, num_experts_per_tok=2)
    names = linear_layer_names(model)
    assert expert_parameter_names(model) == experts
    layout, source = layout_for(model_type, names, experts)
    assert source == how and sorted(layout.expert_parameters) == experts
    attention = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    everything = peft_wrapped(get_peft_model(model, LoraConfig(
        r=2, **resolve_targets(layout, ["all-linear"], names, model_type).lora_kwargs())))  # fmt: skip
    assert set(everything) == attention | set(experts) and all(layers == {0, 1} for layers in everything.values())
    qkvo = peft_wrapped(get_peft_model(build(model_type, num_local_experts=4, num_experts_per_tok=2), LoraConfig(
        r=2, **resolve_targets(layout, ["q", "k", "v", "o"], names, model_type).lora_kwargs())))  # fmt: skip
    assert set(qkvo) == attention


def test_a_group_the_model_cannot_place_is_one_line_naming_the_fix():
    """Qwen3.5's linear-attention layers have out_proj beside the full-attention layers' o_proj: 'o' fits two
    conventions, so it is not guessed, and asking for it is a message, not a KeyError."""
    model = build("qwen3_5_text")
    names = linear_layer_names(model)
    layout, source = layout_for("unknown_hybrid", names, expert_parameter_names(model))  # as if not in the table
    assert source == "inferred" and "o" not in layout.groups
    with pytest.raises(
        ModuleResolutionError,
        match=r"groups \['o'\] could not be placed in unknown_hybrid.*explicitly.*linear_attn.out_proj",
    ):
        resolve_targets(layout, ["q", "k", "v", "o"], names, "unknown_hybrid")


def test_a_group_that_reaches_only_some_layers_is_recorded_and_one_that_reaches_none_is_refused():
    """In a hybrid model the attention projections exist only in the full-attention layers: PEFT wraps them
    there, and the run records how many layers its request reached."""
    model = build("qwen3_5_text")
    kinds = tiny_config("qwen3_5_text").layer_types
    full = {i for i, kind in enumerate(kinds) if kind == "full_attention"}
    assert 0 < len(full) < len(kinds)
    names = linear_layer_names(model)
    layout, _ = layout_for("qwen3_5_text", names, ())
    targets = resolve_targets(layout, ["q", "self_attn.o_proj"], names, "qwen3_5_text")
    peft_model = get_peft_model(model, LoraConfig(r=2, **targets.lora_kwargs()))
    coverage = group_coverage(layout, ["q", "self_attn.o_proj"], peft_wrapped(peft_model), len(kinds))
    assert coverage["q"] == {"modules": ["self_attn.q_proj"], "layers": len(full), "of": len(kinds)}
    assert check_coverage(coverage, "qwen3_5_text") == [
        f"q: {len(full)} of {len(kinds)} layers",
        f"self_attn.o_proj: {len(full)} of {len(kinds)} layers",
    ]
    with pytest.raises(ModuleResolutionError, match=r"\['mlp'\] wrapped nothing"):
        check_coverage({**coverage, "mlp": {"modules": [], "layers": 0, "of": len(kinds)}}, "qwen3_5_text")


def test_inference_keeps_fused_layouts_fused():
    layout = infer_layout(["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head"])
    assert layout is not None and layout.fused == (("q", "k", "v"),) and layout.fan_in_fan_out


@pytest.mark.parametrize(("model_type", "explicit"), [("mamba", "mixer.in_proj"), ("rwkv", "attention.key")])
def test_unplaceable_family_lists_its_linear_layers(model_type, explicit):
    """Mamba and RWKV have no attention projections: no standard name places q, so groups are not guessed (and
    RWKV's 3-D token-mixing vectors are not taken for experts). Explicit names work; on Mamba, a request that
    reaches the output projection PEFT refuses there is one line before anything loads."""
    model = build(model_type)
    names, experts = linear_layer_names(model), expert_parameter_names(model)
    assert experts == []
    layout, source = layout_for(model_type, names, experts)
    assert (layout, source) == (None, "none")
    with pytest.raises(ModuleResolutionError, match=rf"not defined for architecture '{model_type}' .*{explicit}"):
        resolve_targets(layout, ["q"], names, model_type)
    assert resolve_targets(layout, [explicit], names, model_type).modules == [explicit]
    if model_type == "mamba":
        for request in (["all-linear"], ["mixer.out_proj"]):
            with pytest.raises(ModuleResolutionError, match=r"reaches .*out_proj.*which PEFT refuses .*\(mamba\)"):
                resolve_targets(layout, request, names, model_type)


@pytest.mark.parametrize(
    ("model_type", "variant", "group", "names", "parameters"),
    [
        ("deepseek_v3", {"q_lora_rank": None}, "q", {"self_attn.q_proj"}, set()),
        ("deepseek_v2", {"q_lora_rank": 16}, "q", {"self_attn.q_a_proj", "self_attn.q_b_proj"}, set()),
        ("granitemoehybrid", {"num_local_experts": 0}, "mlp",
         {"shared_mlp.input_linear", "shared_mlp.output_linear"}, set()),
        ("granitemoehybrid", {}, "mlp", {"shared_mlp.input_linear", "shared_mlp.output_linear"},
         {"block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"}),
        ("llama4_text", {"interleave_moe_layer_step": 2}, "mlp",
         {*(f"feed_forward.{n}" for n in LLAMA4_DENSE), *(f"feed_forward.shared_expert.{n}" for n in LLAMA4_DENSE)},
         {"feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"}),
        ("llama4_text", {}, "mlp", {f"feed_forward.shared_expert.{n}" for n in LLAMA4_DENSE},
         {"feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"}),
    ],
)  # fmt: skip
def test_checkpoints_of_one_family_get_the_names_they_have(model_type, variant, group, names, parameters):
    """A family whose checkpoints differ (query compression or not, experts or not) maps a group to what this
    checkpoint has; a required name it lacks is still an error."""
    model = build(model_type, **variant)
    layout = model_layout(model_type, model)
    assert (wrapped(model, resolve_targets(layout, [group], linear_layer_names(model), model_type))
            == (names, parameters))  # fmt: skip
    layers = [name for name in linear_layer_names(model) if not any(names_match(name, w) for w in names)]
    with pytest.raises(ModuleResolutionError, match=r"not found in"):
        resolve_targets(layout, [group], layers, model_type)


def test_phi2_output_projection_is_dense_not_o_proj():
    names = linear_layer_names(build("phi"))
    assert resolve_targets(ARCHITECTURES["phi"], ["o"], names, "phi").modules == ["dense"]
    with pytest.raises(ModuleResolutionError, match=r"\['o_proj'\] not found in phi; its linear layers: .*dense"):
        resolve_targets(ARCHITECTURES["phi"], ["o_proj"], names, "phi")


def test_explicit_names_and_all_linear():
    names = linear_layer_names(build("llama"))
    layout = ARCHITECTURES["llama"]
    assert resolve_targets(layout, ["q_proj", "mlp"], names, "llama").modules == [
        "down_proj",
        "gate_proj",
        "q_proj",
        "up_proj",
    ]
    assert resolve_targets(layout, ["all-linear"], names, "llama").modules == "all-linear"


def test_the_docs_list_every_family_as_the_code_maps_it():
    readme = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    start, end = "<!-- families:start -->", "<!-- families:end -->"
    assert start in readme and end in readme
    listed = readme.split(start)[1].split(end)[0].strip()
    assert listed == families_table(), "regenerate with: python -m lora_study.study.modules"


# --- a family beside Llama through the whole workflow ---------------------------------------------------------


def test_a_gemma2_model_runs_the_whole_workflow_with_the_attention_it_supports(tiny_gemma2, tmp_path):
    """Gemma 2 has no SDPA in transformers: `auto` picks eager in the planner, training and evaluation."""
    config = tiny_study_config(tiny_gemma2)
    # One run adapting every module group: attention and Gemma 2's gated MLP.
    config["sweep"] = {"grids": [{"rank": [4], "modules": [["q", "k", "v", "o", "mlp"]], "quantization": ["nf4"]}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    table = pd.read_csv(tmp_path / "results/tables/runs.csv")
    assert list(table["run_id"]) == ["base-nf4", "r4-qkvo-mlp-nf4"]
    assert table["perplexity"].map(math.isfinite).all()
    trained = table[~table["is_baseline"]]
    assert (trained["attn_implementation"] == "eager").all()
    assert trained["plan_predicted_cpu_gb"].map(math.isfinite).all()
    manifest = yaml.safe_load((tmp_path / "results/model/model.json").read_text())
    assert manifest["module_layout"]["source"] == "known" and manifest["attention_support"]["sdpa"] is False
    assert (tmp_path / "results/report/findings.html").stat().st_size > 10_000


@pytest.mark.parametrize(
    "model_type, modules, partial",
    [("qwen3_5_text", ["q", "k", "v", "o", "mixer", "mlp"], "q: 1/4 layers"),
     ("deepseek_v3", ["q", "k", "v", "o", "mlp"], None)],
)  # fmt: skip
def test_a_hybrid_and_a_latent_attention_model_run_the_whole_workflow(tiny_llama, tmp_path, model_type, modules,
                                                                       partial):  # fmt: skip
    """Qwen3.5 (attention in 1 of 4 layers, gated linear attention in the rest) and DeepSeek-V3 (MLA, experts):
    trained, evaluated and reported, each group recorded with the layers it reached; the report says when a
    group reached only some layers."""
    from conftest import build_tiny_family

    model_dir = build_tiny_family(tmp_path / "model", model_type, tiny_llama)
    config = tiny_study_config(model_dir)
    config["training"]["lora_dropout"] = 0.0  # experts' 3-D weights take no dropout
    config["sweep"] = {"grids": [{"rank": [4], "modules": [modules], "quantization": ["nf4"]}]}
    workdir = tmp_path / "study"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    table = pd.read_csv(workdir / "results/tables/runs.csv").set_index("run_id")
    trained = table[~table["is_baseline"]]
    assert len(trained) == 1 and trained["perplexity"].map(math.isfinite).all()
    run_id = trained.index[0]
    metrics = yaml.safe_load((workdir / f"results/runs/{run_id}/train_metrics.json").read_text())
    coverage = metrics["target_coverage"]
    assert set(coverage) == set(modules) and all(found["modules"] for found in coverage.values())
    findings = (workdir / "results/report/findings.md").read_text()
    if partial:
        assert partial in trained.loc[run_id, "target_layers"]
        assert coverage["mixer"]["layers"] == 3 and "Only part of the model adapted" in findings
    else:
        assert all(found["layers"] == found["of"] for found in coverage.values())
        assert set(metrics["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
        assert "mlp.shared_experts.gate_proj" in coverage["mlp"]["modules"]


def test_two_requests_that_train_the_same_modules_are_refused_naming_both(tiny_llama):
    """On a Llama, all-linear is q,k,v,o + mlp: a study sweeping both would train one adapter twice and report
    "adding the rest changes nothing". Refused before any job runs; replicates of one request are not."""
    from lora_study.study.config import validate_config
    from lora_study.study.preflight import PreflightError, check_at_start
    from lora_study.study.sweep import expand_study

    def study(modules: list[list[str]]) -> list:
        config = tiny_study_config(tiny_llama)
        config["sweep"] = {"baseline": False, "noise_replicates": 2,
                           "grids": [{"rank": [4], "modules": modules, "quantization": ["nf4"]}]}  # fmt: skip
        return list(expand_study(validate_config(config)).values())

    with pytest.raises(PreflightError, match=r"runs 'r4-qkvo-mlp-nf4' \(q, k, v, o, mlp\) and 'r4-all-nf4' "
                                             r"\(all-linear\) would train the same modules"):  # fmt: skip
        check_at_start(str(tiny_llama), study([["q", "k", "v", "o", "mlp"], ["all-linear"]]))
    assert check_at_start(str(tiny_llama), study([["q", "k", "v", "o"], ["all-linear"]]))


def test_a_dense_granite_hybrid_is_not_refused_at_start_for_experts_it_does_not_have(tiny_llama, tmp_path):
    """Granite 4's dense hybrids have no experts: at start (config.json only) mlp with dropout must not meet the
    experts' dropout rule; families whose checkpoints differ are checked on the prepared model instead."""
    from lora_study.study.config import validate_config
    from lora_study.study.preflight import check_at_start
    from lora_study.study.sweep import expand_study

    tiny_config("granitemoehybrid", num_local_experts=0).save_pretrained(tmp_path)
    config = tiny_study_config(tiny_llama)
    config["training"]["lora_dropout"] = 0.05
    grid = {"rank": [4], "modules": [["mlp"], ["all-linear"]], "quantization": ["nf4"]}
    config["sweep"] = {"baseline": False, "noise_replicates": 1, "grids": [grid]}
    assert check_at_start(str(tmp_path), expand_study(validate_config(config)).values()) is False


@pytest.mark.parametrize("compute", ["bf16", "fp32"])
@pytest.mark.parametrize("model_type", [*sorted(ARCHITECTURES), "gpt_oss", "bloom", "opt"])
def test_the_planner_predicts_every_family(model_type, compute):
    """A finite prediction for every family the study trains, in both recipes: Bloom builds its ALiBi bias from
    the 2-D padding mask, and the experts' grouped matmul takes only bf16 on the meta device (an fp32 plan
    counts it in bf16 at fp32 size)."""
    from lora_study.study.modules import attention_support
    from lora_study.training.planner import plan_study
    from lora_study.training.precision import DeviceCapability, recipe_for

    model = build(model_type)
    names, experts = linear_layer_names(model), expert_parameter_names(model)
    layout, _ = layout_for(model_type, names, experts)
    groups = ["all-linear"] if model_type in ("gemma3",) else ["q", "k", "v", "o", "mlp"]
    runs = list(expand_study(validate_config({
        "model": {"source": "x"}, "dataset": {"source": "generated"}, "training": {"lora_dropout": 0.0},
        "sweep": {"baseline": False, "grids": [{"rank": [4], "modules": [groups], "quantization": ["nf4"]}]},
    })).values())  # fmt: skip
    capability = DeviceCapability("cpu", "test", "AVX512", ("avx512_bf16",) if compute == "bf16" else ())
    recipe = recipe_for("nf4", "auto", capability)
    assert recipe.compute_dtype == compute
    attention = "sdpa" if attention_support(type(model))["sdpa"] else "eager"
    (plan,) = plan_study(runs, tiny_config(model_type), {runs[0].run_id: resolve_targets(layout, groups, names,
                         model_type)}, [20] * 8, [10] * 8, "cpu", None, recipes={runs[0].run_id: recipe},
                         attention={runs[0].run_id: attention})  # fmt: skip
    assert plan.plan_error == "" and math.isfinite(plan.predicted_gb) and plan.activations_gb > 0


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return next(m for name, m in model.named_modules() if name.endswith("layers") and
                isinstance(m, torch.nn.ModuleList) and "vision" not in name)  # fmt: skip


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_text", "qwen3_next", "lfm2", "granitemoehybrid",
                                        "jamba"])  # fmt: skip
def test_hybrid_attention_groups_reach_the_attention_layers_and_mixer_the_others(model_type):
    """Hybrids: q, k, v, o wrap the attention layers only (1 of 4 in the tiny Qwen3.5), mixer the token-mixing
    layers that are not attention (the other 3: gated linear attention, short convolution or Mamba), mlp every
    layer; the run records exactly that."""
    model = build(model_type)
    layout = model_layout(model_type, model)
    layers = decoder_layers(model)
    attention_layers = {i for i, layer in enumerate(layers) if getattr(layer, "self_attn", None) is not None}
    assert 0 < len(attention_layers) < len(layers)
    names = linear_layer_names(model)
    groups = ["q", "k", "v", "o", "mixer"]
    wrapped_layers = peft_wrapped(get_peft_model(model, LoraConfig(r=2, **resolve_targets(
        layout, groups, names, model_type).lora_kwargs())))  # fmt: skip

    def of(groups_: list[str]) -> set[str]:
        return {n for n in wrapped_layers if any(names_match(n, t) for g in groups_ for t in layout.groups[g])}

    attention, mixer = of(["q", "k", "v", "o"]), of(["mixer"])
    assert attention and mixer and not attention & mixer and attention | mixer == set(wrapped_layers)
    assert all(wrapped_layers[n] == attention_layers for n in attention)
    assert all(wrapped_layers[n] == set(range(len(layers))) - attention_layers for n in mixer)
    coverage = group_coverage(layout, groups, wrapped_layers, len(layers))
    mixer_layers = len(layers) - len(attention_layers)
    assert [coverage[g]["layers"] for g in groups] == [len(attention_layers)] * 4 + [mixer_layers]
    assert modules_label(groups) == "qkvo-mixer"


def test_latent_attention_maps_to_the_low_rank_projections():
    """DeepSeek-V3: q = q_a_proj + q_b_proj, k and v share kv_a_proj_with_mqa + kv_b_proj (one fused pair),
    mlp = dense MLP + shared experts + the experts' 3-D weights."""
    model = build("deepseek_v3")
    names, layout = linear_layer_names(model), model_layout("deepseek_v3", model)
    with pytest.raises(ModuleResolutionError, match=r"stores k, v as one fused layer"):
        resolve_targets(layout, ["q", "k"], names, "deepseek_v3")
    layers, parameters = wrapped(build("deepseek_v3"), resolve_targets(layout, ["q", "k", "v", "o"], names,
                                                                       "deepseek_v3"))  # fmt: skip
    assert layers == {"self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                      "self_attn.kv_b_proj", "self_attn.o_proj"} and not parameters  # fmt: skip
    layers, parameters = wrapped(build("deepseek_v3"), resolve_targets(layout, ["mlp"], names, "deepseek_v3"))
    assert layers == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.shared_experts.gate_proj",
                      "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"}  # fmt: skip
    assert parameters == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
