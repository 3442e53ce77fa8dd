import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lora_study.batching import IGNORE_INDEX, collate
from lora_study.metrics import perplexity
from lora_study.train import response_loss_sum


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
    loss_sum, count = response_loss_sum(model, batch)
    reference = model(**batch).loss  # transformers' mean over the same labels
    assert count == 4
    assert float(loss_sum) / count == pytest.approx(float(reference), rel=1e-5)
