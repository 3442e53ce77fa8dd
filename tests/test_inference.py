"""Evaluation's shortcuts against the full computation (lora_study.training.inference): a prompt prefix a batch
shares runs once, and on CPU 4-bit weights are dequantized once, on a real trained model and real
bitsandbytes layers."""

from __future__ import annotations

import logging

import pytest
import torch

from lora_study.measure.evaluate import greedy_answers, normalize_answer, response_nll
from lora_study.training.inference import MIN_SHARED_PREFIX, common_prefix_length, dequantized_once, packing_pays
from lora_study.training.loss import SHORTCUT, ResponseLoss
from lora_study.training.precision import detect_capability, recipe_for

CPU = torch.device("cpu")
# A system turn every row opens with, as chat-formatted data sets (the default data included) have.
SYSTEM_TURN = "<|im_start|>system\nAnswer with the result only, exactly as asked.<|im_end|>\n"


def with_system_turn(rows: list[dict], tokenizer) -> list[dict]:
    prefix = tokenizer(SYSTEM_TURN, add_special_tokens=False)["input_ids"]
    assert len(prefix) >= MIN_SHARED_PREFIX
    return [{**r, "input_ids": prefix + list(r["input_ids"]), "prompt_length": len(prefix) + r["prompt_length"]}
            for r in rows]  # fmt: skip


def fp32_recipe():
    return recipe_for("fp32", "fp32", detect_capability(CPU))


def test_common_prefix_length() -> None:
    shared = list(range(100, 112))
    assert common_prefix_length([[*shared, 1, 2], [*shared, 3], [*shared, 1]], limit=50) == 12
    assert common_prefix_length([[*shared, 1, 2], [*shared, 1, 2, 3]], limit=50) == 14
    assert common_prefix_length([[*shared, 1], [*shared, 1]], limit=10) == 10  # never past the limit
    assert common_prefix_length([shared, shared[:-5] + [0] * 5], limit=50) == 0  # 7 tokens: not worth it
    assert common_prefix_length([shared], limit=50) == 0  # one row shares with nobody


def test_packing_pays_for_short_rows_only() -> None:
    """The default data (8 rows of up to 70 tokens after a 24-token system turn, hidden size 576) packs; rows of
    2,048 tokens would attend over 32,000 and do not, nor does anything past the mask's size limit."""
    assert packing_pays(rows=8, width=70, packed=24 + 8 * 30, hidden_size=576)
    assert not packing_pays(rows=16, width=2048, packed=24 + 16 * 2000, hidden_size=2560)
    assert not packing_pays(rows=2, width=6000, packed=9000, hidden_size=8192)


@pytest.fixture(scope="module")
def trained(answering_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, rows = answering_model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, tokenizer, with_system_turn(rows, tokenizer)


def test_perplexity_with_a_shared_prefix_is_the_full_computation(trained, caplog) -> None:
    model, tokenizer, rows = trained
    full = ResponseLoss(model, SHORTCUT)
    full.prefix_check.usable = False
    expected, tokens = response_nll(full, rows, 8, tokenizer.pad_token_id, CPU, fp32_recipe())
    with caplog.at_level(logging.INFO, logger="lora_study"):
        shared, shared_tokens = response_nll(ResponseLoss(model, SHORTCUT), rows, 8, tokenizer.pad_token_id, CPU,
                                             fp32_recipe())  # fmt: skip
    assert "response loss: shared prompt prefix computed once per batch" in caplog.text
    assert shared_tokens == tokens and sum(tokens) > 100
    assert shared == pytest.approx(expected, rel=1e-5)


def test_greedy_answers_with_a_shared_prefix_are_the_full_computations(trained, caplog) -> None:
    model, tokenizer, rows = trained
    arguments = (model, rows, 16, 8, tokenizer, tokenizer.pad_token_id, CPU, fp32_recipe())
    full = greedy_answers(*arguments, share_prefix=False)
    with caplog.at_level(logging.INFO, logger="lora_study"):
        shared = greedy_answers(*arguments)
    assert "greedy generation: shared prompt prefix computed once per batch" in caplog.text
    # Prompts of different lengths in one batch: the padding sits between the prefix and each prompt's rest.
    assert len({r["prompt_length"] for r in rows[:16]}) > 3
    assert len({normalize_answer(a) for a in full}) > 5  # varied answers: agreement is not trivial
    assert shared == full


def test_a_cache_that_is_not_plain_keys_and_values_is_never_shared(tiny_llama, tmp_path, caplog) -> None:
    """Qwen3.5's linear-attention layers keep a recurrent state: rows are computed in full, as before."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import build_tiny_family
    from lora_study.prepare.data import tokenize_record
    from lora_study.prepare.datagen import generate_examples

    model_dir = build_tiny_family(tmp_path / "qwen3_5", "qwen3_5_text", tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = with_system_turn([tokenize_record(r, "chat", tokenizer) for r in generate_examples(8, 5)], tokenizer)
    full = ResponseLoss(model, SHORTCUT)
    full.prefix_check.usable = False
    expected, _ = response_nll(full, rows, 8, tokenizer.pad_token_id, CPU, fp32_recipe())
    loss = ResponseLoss(model, SHORTCUT)
    with caplog.at_level(logging.INFO, logger="lora_study"):
        got, _ = response_nll(loss, rows, 8, tokenizer.pad_token_id, CPU, fp32_recipe())
        answers = greedy_answers(model, rows, 8, 4, tokenizer, tokenizer.pad_token_id, CPU, fp32_recipe())
    assert loss.prefix_check.usable is False
    assert "response loss: each row computed in full (the model's cache is not a plain key/value cache)" in caplog.text
    assert "greedy generation: each row computed in full" in caplog.text
    assert got == expected  # the same computation, bit for bit
    full_answers = greedy_answers(model, rows, 8, 4, tokenizer, tokenizer.pad_token_id, CPU, fp32_recipe(),
                                  share_prefix=False)  # fmt: skip
    assert answers == full_answers


def four_bit_layer(nested: bool, compute_dtype: torch.dtype):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=compute_dtype, compress_statistics=nested,
                              quant_type="nf4")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 128), requires_grad=False, quant_type="nf4",
                                     compress_statistics=nested)  # fmt: skip
    layer.bias = torch.nn.Parameter(torch.randn(96))
    layer = layer.to("cpu")  # quantizes
    layer.support_avx512bf16_for_cpu = False  # evaluation's setting (loading.compute_4bit_as_in_training)
    return layer.eval()


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quantized"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantized_once_is_bitsandbytes_arithmetic_bit_for_bit(nested: bool, compute_dtype: torch.dtype) -> None:
    layer = four_bit_layer(nested, compute_dtype)
    assert layer.weight.quant_state.nested is nested
    inputs = [torch.randn(3, 5, 128), torch.randn(7, 1, 128)]  # a prompt, then decoding steps
    with torch.inference_mode():
        expected = [layer(x) for x in inputs]
        with dequantized_once(layer) as patched:
            got = [layer(x) for x in inputs + inputs]
        after = layer(inputs[0])
    assert patched == 1
    assert all(torch.equal(e, g) for e, g in zip(expected + expected, got, strict=True))
    assert got[0].dtype == torch.float32  # cast back to the input's dtype, as bitsandbytes does
    assert "forward" not in vars(layer) and torch.equal(after, expected[0])  # bitsandbytes' own forward again


def test_int8_layers_never_share_a_prefix(caplog) -> None:
    """bitsandbytes' int8 layers pick outlier columns over the whole batch: a row's numbers depend on its batch."""
    import bitsandbytes as bnb

    from lora_study.training.inference import SharedPrefixCheck

    int8 = torch.nn.Sequential(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=6.0))
    plain = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with caplog.at_level(logging.INFO, logger="lora_study"):
        assert SharedPrefixCheck("greedy generation", int8).usable is False
        assert SharedPrefixCheck("greedy generation", plain).usable is None  # decided by the check on first use
    assert "each row computed in full (int8 layers split each batch's columns by its outliers)" in caplog.text


def lora_step(model, batch: dict, share: bool, dropout: float = 0.0, checkpointing: bool = False):
    """One training forward and backward of a fresh LoRA (both factors random, so every factor has a gradient)
    on a copy of `model`: (summed loss, LoRA gradients, the loss object)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = copy.deepcopy(model)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=dropout,
                        init_lora_weights=False)  # fmt: skip
    lora = get_peft_model(base, config).train()
    loss = ResponseLoss(lora, SHORTCUT)
    loss.shares_prefix_in_training = share
    total, _ = loss(batch)
    total.backward()
    gradients = {name: p.grad.clone() for name, p in lora.named_parameters() if p.requires_grad}
    return total.item(), gradients, loss


def test_a_training_step_with_a_shared_prefix_is_the_full_computation(trained, caplog) -> None:
    from lora_study.training.batching import collate

    model, tokenizer, rows = trained
    batch = collate(rows[:8], tokenizer.pad_token_id)
    expected, expected_gradients, full = lora_step(model, batch, share=False)
    with caplog.at_level(logging.INFO, logger="lora_study"):
        shared, gradients, loss = lora_step(model, batch, share=True)
    assert "training loss: shared prompt prefix computed once per batch" in caplog.text
    assert loss.prefix_check.usable is True and full.prefix_check.usable is None  # one shared, one never asked
    assert shared == pytest.approx(expected, rel=1e-5)
    assert len(gradients) == 6 * model.config.num_hidden_layers
    for name, gradient in gradients.items():
        reference = expected_gradients[name]
        assert reference.abs().max() > 0, name
        assert float((gradient - reference).abs().max() / reference.abs().max()) < 1e-4, name


@pytest.mark.parametrize(("dropout", "checkpointing", "reason"), [
    (0.1, False, "dropout draws each row its own mask"),
    (0.0, True, "gradient checkpointing is on"),
])  # fmt: skip
def test_training_computes_every_row_in_full_where_rows_differ(trained, caplog, dropout, checkpointing, reason):
    from lora_study.training.batching import collate

    model, tokenizer, rows = trained
    batch = collate(rows[:8], tokenizer.pad_token_id)
    with caplog.at_level(logging.INFO, logger="lora_study"):
        _, _, loss = lora_step(model, batch, share=True, dropout=dropout, checkpointing=checkpointing)
    assert f"each row computed in full in training ({reason})" in caplog.text
    assert loss.prefix_check.usable is None and "shared prompt prefix" not in caplog.text
