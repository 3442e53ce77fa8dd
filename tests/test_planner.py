"""The memory planner against real components: bitsandbytes' own quantized tensors
and autograd's own saved tensors on a real forward pass."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lora_study.planner import (
    BatchShape,
    largest_batch,
    model_facts,
    saved_activation_bytes,
    weights_bytes,
)


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes a loaded model holds: parameters, buffers and 4-bit quantization constants."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
                total += state.state2.code.numel() * state.state2.code.element_size()
        if hasattr(param, "SCB") and param.SCB is not None:
            total += param.SCB.numel() * param.SCB.element_size()
    return total


@pytest.mark.parametrize(
    "quantization, double_quant",
    [("nf4", True), ("nf4", False), ("int8", False), ("bf16", False), ("fp32", False)],
)
def test_predicted_weights_match_what_a_loaded_model_holds(tiny_llama, quantization, double_quant):
    from peft import prepare_model_for_kbit_training

    from lora_study.loading import quantization_config

    config = quantization_config(quantization, double_quant, "bf16")
    dtype = torch.bfloat16 if quantization in ("nf4", "int8", "bf16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=dtype, quantization_config=config)
    if config is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary tables: not weights
    facts = model_facts(AutoConfig.from_pretrained(tiny_llama))
    predicted = weights_bytes(facts, quantization, double_quant)
    assert predicted == pytest.approx(held_bytes(model) - buffers, rel=0.01)


def real_saved_bytes(model, batch: int, seq: int) -> int:
    """Unique non-parameter storages autograd saves in one real forward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 300, (batch, seq))
    mask = torch.zeros(batch, 1, seq, seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().base_model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(seq)[None])
    return sum(storages.values())


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj")])
def test_counted_activations_match_a_real_forward_pass(tiny_llama, targets):
    from peft import LoraConfig, get_peft_model

    config = AutoConfig.from_pretrained(tiny_llama)
    # Eager attention on both sides: the real CPU pass keeps its T x T matrices too.
    counted, _ = saved_activation_bytes(config, targets, 8, 0.1, "float32", False, "eager", 4, 48)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), lora_dropout=0.1))
    model.train()
    assert counted == pytest.approx(real_saved_bytes(model, 4, 48), rel=0.10)


def test_the_largest_batch_is_the_one_the_run_will_draw():
    lengths = [10] * 63 + [100]
    prompts = [8] * 63 + [90]
    training = {"batch_size": 8, "seed": 0, "group_by_length": False, "max_steps": 8, "epochs": None,
                "gradient_accumulation_steps": 1}  # fmt: skip
    # Eight steps of eight rows cover the whole epoch: the long row is drawn.
    assert largest_batch(lengths, prompts, training) == BatchShape(8, 100, 7 * 2 + 10)
    # One step sees only its own eight rows.
    one_step = largest_batch(lengths, prompts, {**training, "max_steps": 1})
    assert one_step.rows == 8 and one_step.padded_length in (10, 100)
