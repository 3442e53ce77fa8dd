"""Module groups resolved on real models built from configs (random weights, no download)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

from lora_study.modules import (
    ModuleResolutionError,
    linear_layer_names,
    needs_fan_in_fan_out,
    resolve_target_modules,
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)


def llama():
    return LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2))


def phi():
    return PhiForCausalLM(PhiConfig(**SMALL))


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64))


def lora_layers(model, targets, fan_in_fan_out=False) -> set[str]:
    """The layers PEFT actually wrapped, by per-layer name."""
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets, fan_in_fan_out=fan_in_fan_out))
    wrapped = {
        name.split(".layers.")[-1].split(".h.")[-1]
        for name, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and len(m.lora_A)
    }
    return {name.split(".", 1)[1] for name in wrapped}


@pytest.mark.parametrize(
    "build, groups, expected",
    [
        (llama, ["q", "v"], {"self_attn.q_proj", "self_attn.v_proj"}),
        (
            llama,
            ["q", "k", "v", "o"],
            {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
        ),
        (llama, ["mlp"], {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
        (
            phi,
            ["q", "k", "v", "o"],
            {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"},
        ),
        (phi, ["mlp"], {"mlp.fc1", "mlp.fc2"}),
        (gpt2, ["q", "k", "v"], {"attn.c_attn"}),
        (gpt2, ["o"], {"attn.c_proj"}),
        (gpt2, ["mlp"], {"mlp.c_fc", "mlp.c_proj"}),
    ],
)
def test_groups_wrap_exactly_the_right_layers(build, groups, expected):
    model = build()
    model_type = model.config.model_type
    targets = resolve_target_modules(model_type, groups, linear_layer_names(model))
    assert lora_layers(model, targets, needs_fan_in_fan_out(model_type)) == expected


def test_phi2_output_projection_is_dense_not_o_proj():
    model = phi()
    assert resolve_target_modules("phi", ["o"], linear_layer_names(model)) == ["dense"]
    with pytest.raises(
        ModuleResolutionError, match=r"\['o_proj'\] not found in phi; its linear layers: .*self_attn.dense"
    ):
        resolve_target_modules("phi", ["o_proj"], linear_layer_names(model))


def test_gpt2_fused_qkv_cannot_be_split():
    with pytest.raises(ModuleResolutionError, match="fused layer"):
        resolve_target_modules("gpt2", ["q", "v"], linear_layer_names(gpt2()))


def test_explicit_names_and_all_linear():
    model = llama()
    names = linear_layer_names(model)
    assert resolve_target_modules("llama", ["q_proj", "mlp"], names) == [
        "down_proj",
        "gate_proj",
        "q_proj",
        "up_proj",
    ]
    assert resolve_target_modules("llama", ["all-linear"], names) == "all-linear"


def test_unknown_architecture_lists_its_linear_layers():
    with pytest.raises(ModuleResolutionError, match=r"not defined for architecture 'mamba'.*q_proj"):
        resolve_target_modules("mamba", ["q"], ["self_attn.q_proj"])
