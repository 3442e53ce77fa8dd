import math

import pytest
import torch
from transformers import GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

from lora_study.core.metrics import perplexity
from lora_study.training.batching import IGNORE_INDEX, collate
from lora_study.training.loss import FULL_LOGITS, SHORTCUT, ResponseLoss


def test_perplexity_of_a_hand_computed_case():
    # Three scored tokens with probabilities 1/2, 1/4 and 1/8: NLL = (1+2+3) ln 2.
    total_nll = -(math.log(1 / 2) + math.log(1 / 4) + math.log(1 / 8))
    assert perplexity(total_nll, 3) == pytest.approx(4.0)  # exp(2 ln 2)
    with pytest.raises(ValueError):
        perplexity(0.0, 0)


def test_response_loss_matches_transformers_own_loss_on_response_tokens():
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=50,
        )
    )
    rows = [
        {"input_ids": [5, 6, 7, 8, 9, 10], "prompt_length": 4},
        {"input_ids": [11, 12, 13], "prompt_length": 1},
    ]
    batch = collate(rows, pad_id=0)
    # Prompt and padding are never scored.
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX] * 4 + [9, 10],
        [IGNORE_INDEX, 12, 13, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]
    loss = ResponseLoss(model)
    loss_sum, count = loss(batch)
    reference = model(**batch).loss  # transformers' mean over the same labels
    assert loss.path == SHORTCUT  # checked against the full logits, and they agree
    assert count == 4
    assert float(loss_sum) / count == pytest.approx(float(reference), rel=1e-5)
    # Per row: the same tokens, split by row (2 and 2), summing to the batch's loss.
    row_nll, row_tokens = loss.per_row(batch)
    assert row_tokens.tolist() == [2, 2]
    assert float(row_nll.sum()) == pytest.approx(float(loss_sum), rel=1e-6)
    single = ResponseLoss(model).per_row(collate(rows[1:], pad_id=0))[0]
    assert float(row_nll[1]) == pytest.approx(float(single[0]), rel=1e-5)  # padding changes nothing


@pytest.mark.parametrize("known_by_name", [True, False])
def test_a_model_that_scales_its_logits_trains_on_its_own_logits(monkeypatch, known_by_name):
    """Granite divides logits by logits_scaling after the head: the head-only shortcut would be wrong.

    Caught by name (a known attribute) and, for families not on that list, by the numerical check.
    """
    if not known_by_name:
        monkeypatch.setattr("lora_study.training.loss.LOGIT_POST_PROCESSING", ())
    torch.manual_seed(0)
    config = GraniteConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=50, logits_scaling=8.0)  # fmt: skip
    model = GraniteForCausalLM(config)
    batch = collate([{"input_ids": [5, 6, 7, 8, 9, 10], "prompt_length": 3}], pad_id=0)
    loss = ResponseLoss(model)
    loss_sum, count = loss(batch)
    assert loss.path == FULL_LOGITS
    assert float(loss_sum) / count == pytest.approx(float(model(**batch).loss), rel=1e-5)


def test_the_output_head_check_takes_both_sides_from_one_pass_of_the_body():
    """The check compares the model's logits with the head applied to the hidden states its body produced in
    that same pass: the body runs once for the check, once more for the batch's loss."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50)  # fmt: skip
    model = LlamaForCausalLM(config)
    calls = []
    model.model.register_forward_hook(lambda module, args, output: calls.append(1))
    batch = collate([{"input_ids": [5, 6, 7, 8, 9, 10], "prompt_length": 3}], pad_id=0)
    loss = ResponseLoss(model)
    loss_sum, count = loss(batch)
    assert loss.path == SHORTCUT
    assert len(calls) == 2
    assert float(loss_sum) / count == pytest.approx(float(model(**batch).loss), rel=1e-5)


def test_the_training_phase_has_its_own_peak_beside_the_whole_jobs():
    import torch

    from lora_study.core.metrics import PeakMemory

    memory = PeakMemory(torch.device("cpu"))
    with memory:
        load = bytearray(300_000_000)  # the load and checks: a large, short-lived peak
        del load
        memory.mark_training_start()
        train = bytearray(60_000_000)
        report = memory.report()
        del train
    assert report["memory_kind"] == report["train_memory_kind"] == "cpu_peak_rss"
    # The whole job still counts the load's peak; the training phase does not.
    assert report["peak_memory_gb"] - report["train_peak_memory_gb"] > 0.2
    assert report["train_peak_memory_gb"] > 0.05
