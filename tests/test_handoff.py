"""The evaluation a training job hands to its evaluate job is taken only under the key it was left with."""

from __future__ import annotations

import json
import logging

from lora_study.measure import handoff


def left_handoff(tmp_path, key):
    written = tmp_path / "staging"
    written.mkdir(exist_ok=True)
    files = {}
    for name in ("eval_metrics.json", "predictions.jsonl", "examples.csv"):
        (written / name).write_text(f"{name} from training\n")
        files[name] = written / name
    handoff.leave(tmp_path / "handoff", key, files)
    return {name: tmp_path / "out" / name for name in files}


def key_for(tmp_path, **changes):
    adapter = tmp_path / "adapter"
    if not adapter.exists():
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    splits = tmp_path / "splits" / "validation"
    splits.mkdir(parents=True, exist_ok=True)
    if not (splits / "data.arrow").exists():
        (splits / "data.arrow").write_bytes(b"rows")
    values = {
        "run_params": {"run_id": "r4"},
        "evaluation": {"batch_size": 8},
        "compute": {},
        "device": None,
        "manifest": {"path": "m"},
        "adapter_dir": tmp_path / "adapter",
        "splits_dir": tmp_path / "splits",
        "threads": 2,
    }
    return handoff.handoff_key(**{**values, **changes})


def test_a_matching_handoff_is_taken_whole_and_removed(tmp_path):
    outputs = left_handoff(tmp_path, key_for(tmp_path))
    assert handoff.take(tmp_path / "handoff", key_for(tmp_path), outputs)
    assert all(path.read_text().endswith("from training\n") for path in outputs.values())
    assert not (tmp_path / "handoff").exists()


def test_any_change_since_training_refuses_the_handoff_and_removes_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lora_study")
    changes = {
        "evaluation": lambda: {"evaluation": {"batch_size": 4}},
        "compute": lambda: {"compute": {"compute_dtype": "bf16"}},
        "device": lambda: {"device": "cpu"},
        "manifest": lambda: {"manifest": {"path": "other"}},
        "threads": lambda: {"threads": 8},
    }
    for field, change in changes.items():
        outputs = left_handoff(tmp_path, key_for(tmp_path))
        caplog.clear()
        assert not handoff.take(tmp_path / "handoff", key_for(tmp_path, **change()), outputs)
        assert not any(path.exists() for path in outputs.values())
        assert not (tmp_path / "handoff").exists()
        assert f"changed since: {field}" in caplog.text
    # The adapter's bytes (a retrained run) and the validation rows are part of the key too.
    key = key_for(tmp_path)
    outputs = left_handoff(tmp_path, key)
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"retrained")
    assert not handoff.take(tmp_path / "handoff", key_for(tmp_path), outputs)
    outputs = left_handoff(tmp_path, key_for(tmp_path))
    (tmp_path / "splits" / "validation" / "data.arrow").write_bytes(b"other rows")
    assert not handoff.take(tmp_path / "handoff", key_for(tmp_path), outputs)


def test_a_handoff_missing_a_file_or_its_key_is_not_taken(tmp_path):
    outputs = left_handoff(tmp_path, key_for(tmp_path))
    (tmp_path / "handoff" / "examples.csv").unlink()
    assert not handoff.take(tmp_path / "handoff", key_for(tmp_path), outputs)
    outputs = left_handoff(tmp_path, key_for(tmp_path))
    (tmp_path / "handoff" / handoff.KEY_FILE).write_text("{not json")
    assert not handoff.take(tmp_path / "handoff", key_for(tmp_path), outputs)
    assert not handoff.take(tmp_path / "never_left", key_for(tmp_path), outputs)
    assert json.loads(json.dumps(key_for(tmp_path), sort_keys=True)) == key_for(tmp_path)


def test_snakemakes_marker_in_the_adapter_folder_is_not_a_change(tmp_path):
    outputs = left_handoff(tmp_path, key_for(tmp_path))
    (tmp_path / "adapter" / handoff.SNAKEMAKE_MARKER).write_text("")  # written after the training job ends
    assert handoff.take(tmp_path / "handoff", key_for(tmp_path), outputs)


def test_a_different_cpu_dispatch_is_a_change(tmp_path, monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    outputs = left_handoff(tmp_path, key_for(tmp_path))
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert not handoff.take(tmp_path / "handoff", key_for(tmp_path), outputs)


def test_which_runs_evaluate_in_training():
    from lora_study.study.config import validate_config
    from lora_study.study.sweep import expand_study

    grid = {"rank": [4], "quantization": ["nf4", "int8", "16bit"]}
    config = validate_config({"model": {"source": "m"}, "dataset": {"source": "generated"}, "sweep": {"grids": [grid]}})
    runs = expand_study(config)
    assert {run_id: handoff.evaluates_in_training(run, config) for run_id, run in runs.items()} == {
        "r4-qkvo-nf4": True, "r4-qkvo-int8": False, "r4-qkvo-16bit": True}  # fmt: skip
    off = {**config, "evaluation": {**config["evaluation"], "in_training_job": False}}
    capped = {**config, "evaluation": {**config["evaluation"], "memory_limit_gb": 4.0}}
    assert not any(handoff.evaluates_in_training(run, off) or handoff.evaluates_in_training(run, capped)
                   for run in runs.values())  # fmt: skip


def test_a_signal_during_work_that_may_be_abandoned_is_an_error_the_caller_catches():
    """The training job's own evaluation runs inside signals_as_errors: a SIGTERM (a time limit) ends it as an
    exception, which InTrainingEvaluation turns into a warning, and the finished training job exits cleanly."""
    import os
    import signal

    from lora_study.training.checkpoints import Interrupted, signals_as_errors

    before = signal.getsignal(signal.SIGTERM)
    caught = None
    try:
        with signals_as_errors():
            os.kill(os.getpid(), signal.SIGTERM)
    except Interrupted as error:
        caught = str(error)
    assert caught == "stopped by signal SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
