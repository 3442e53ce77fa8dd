import datetime as dt
import re

import pytest
from transformers import AutoTokenizer

from lora_study.prepare.data import DataError, load_split, prepare_data, tokenize_record
from lora_study.prepare.datagen import FAMILIES, generate_examples
from lora_study.training.batching import length_grouped_batches


def test_generator_is_deterministic_distinct_and_large_enough():
    examples = generate_examples(2400, seed=0)
    assert examples == generate_examples(2400, seed=0)
    assert examples != generate_examples(2400, seed=1)
    assert len({(e["instruction"], e["input"]) for e in examples}) == 2400
    assert {e["family"] for e in examples} == set(FAMILIES)
    assert all(e["output"] for e in examples)


def test_generated_answers_are_correct():
    checked = 0
    for example in generate_examples(1000, seed=3):
        text, answer = example["instruction"] + " " + example["input"], example["output"]
        if m := re.fullmatch(r"What is (\d+) plus (\d+)\? .*", text.strip()):
            assert int(answer) == int(m[1]) + int(m[2])
        elif m := re.fullmatch(r"Rewrite the date in DD/MM/YYYY form\. (\d{4})-(\d\d)-(\d\d)", text):
            assert answer == f"{m[3]}/{m[2]}/{m[1]}"
        elif m := re.fullmatch(r"What day of the week was (\S+)\? ", text):
            assert answer == dt.date.fromisoformat(m[1]).strftime("%A")
        elif example["instruction"].startswith("Sort the numbers"):
            assert answer == ", ".join(map(str, sorted(int(x) for x in example["input"].split(", "))))
        else:
            continue
        checked += 1
    assert checked > 100


def test_only_response_tokens_and_eos_are_trained(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    record = {"instruction": "Add the numbers.", "input": "2, 3", "output": "5", "family": "arithmetic"}
    for template in ("chat", "alpaca"):
        row = tokenize_record(record, template, tokenizer)
        response = row["input_ids"][row["prompt_length"] :]
        assert tokenizer.decode(response) == "5<|im_end|>"
    alpaca_prompt = tokenizer.decode(tokenize_record(record, "alpaca", tokenizer)["input_ids"])
    assert "### Input:\n2, 3\n\n### Response:\n5" in alpaca_prompt


def dataset_config(**overrides):
    config = {
        "source": "generated", "generated_examples": 300, "template": "chat", "max_length": 256,
        "validation_size": 20, "max_train_examples": None, "seed": 0, "split": "train",
    }  # fmt: skip
    return {**config, **overrides}


def test_prepare_data_splits_without_overlap_and_drops_long_rows(tiny_llama, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    full = prepare_data(dataset_config(), tokenizer, tmp_path / "a")
    assert (full["train_examples"], full["validation_examples"]) == (280, 20)
    train, validation = load_split(tmp_path / "a", "train"), load_split(tmp_path / "a", "validation")
    assert not {tuple(r) for r in train["input_ids"]} & {tuple(r) for r in validation["input_ids"]}

    cutoff = full["median_tokens"]
    short = prepare_data(dataset_config(max_length=cutoff), tokenizer, tmp_path / "b")
    assert 0 < short["rows_dropped_too_long"] < 300
    assert short["train_examples"] + short["validation_examples"] == 300 - short["rows_dropped_too_long"]
    assert max(len(r) for r in load_split(tmp_path / "b", "train")["input_ids"]) <= cutoff


def test_local_files_and_their_errors(tiny_llama, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(f'{{"instruction": "Say {i}.", "input": "", "output": "{i}"}}\n' for i in range(30)))
    summary = prepare_data(dataset_config(source=str(good), validation_size=5), tokenizer, tmp_path / "out")
    assert summary["train_examples"] == 25 and summary["has_exact_answers"] is False

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "output": "y"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 1 has no 'instruction'; its keys: \['output', 'prompt'\]"):
        prepare_data(dataset_config(source=str(bad)), tokenizer, tmp_path / "x")
    with pytest.raises(DataError, match="file not found"):
        prepare_data(dataset_config(source=str(tmp_path / "none.json")), tokenizer, tmp_path / "y")
    with pytest.raises(DataError, match="leaves no training rows"):
        prepare_data(dataset_config(source=str(good), validation_size=30), tokenizer, tmp_path / "z")


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": "b",}'],
         r"line 2 is not valid JSON \(Expecting property name enclosed in double quotes at column 36\)"),
        (['{"instruction": "a", "output": "b"}', "", '["a", "b"]'], r"line 3 is a JSON list, not an object"),
        (['{"instruction": "a", "output": null}'], r"line 1 has no 'output'"),
    ],
)  # fmt: skip
def test_a_malformed_json_line_is_named_with_what_is_wrong(tiny_llama, tmp_path, lines, message):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl " + message):
        prepare_data(dataset_config(source=str(data)), AutoTokenizer.from_pretrained(tiny_llama), tmp_path / "x")


def test_a_json_array_file_names_its_bad_row(tiny_llama, tmp_path):
    data = tmp_path / "rows.json"
    data.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c"}]')
    with pytest.raises(DataError, match=r"rows.json row 2 has no 'output'"):
        prepare_data(dataset_config(source=str(data)), AutoTokenizer.from_pretrained(tiny_llama), tmp_path / "x")


def test_length_grouped_batches_cover_every_row_once_with_little_padding():
    lengths = [(i * 37) % 90 + 10 for i in range(500)]

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    grouped = length_grouped_batches(lengths, batch_size=8, seed=0, group_by_length=True)
    plain = length_grouped_batches(lengths, batch_size=8, seed=0, group_by_length=False)
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == list(range(500))
    assert padded(grouped) < 1.1 * sum(lengths) < 1.3 * sum(lengths) < padded(plain)
    assert grouped != length_grouped_batches(lengths, batch_size=8, seed=1, group_by_length=True)


def test_exact_answers_come_from_a_family_column_or_the_exact_answers_setting(tmp_path, caplog):
    import json

    from lora_study.measure.evaluate import exact_answer_indices
    from lora_study.prepare.data import load_records

    path = tmp_path / "rows.jsonl"
    rows = [{"instruction": f"Say {n}.", "input": "", "output": str(n)} for n in range(4)]
    rows[0]["family"] = "numbers"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"source": str(path), "split": "train"}
    with_column = load_records(config)
    assert [r["family"] for r in with_column] == ["numbers", "", "", ""]  # only declared rows are scored
    declared = load_records({**config, "exact_answers": True})
    assert [r["family"] for r in declared] == ["numbers", "all", "all", "all"]
    assert exact_answer_indices(declared, 3) == [0, 1, 2]
    free_text = [{**r, "family": ""} for r in with_column]
    assert exact_answer_indices(free_text, 3) == []
    assert "no validation row has an exact answer" in caplog.text  # a setting that cannot apply says so
