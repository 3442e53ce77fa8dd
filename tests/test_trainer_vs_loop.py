"""bench/trainer_vs_loop.py from a kit (no weights: drawn at random once) on a tiny model: both sides train,
their memory is of one kind, and the ratios are printed."""

from __future__ import annotations

import importlib.util
import json
import sys

import yaml

from conftest import REPO, prepared_inputs, run_guarded, tiny_study_config

BENCH = REPO / "bench" / "trainer_vs_loop.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("trainer_vs_loop", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_kit_without_weights_trains_both_sides_from_random_weights(tiny_llama, tmp_path):
    config, manifest, splits = prepared_inputs(tiny_llama, tiny_study_config(tiny_llama), tmp_path / "study")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "model.json").write_text(json.dumps(manifest))
    kit = tmp_path / "kit"
    bench_module().make_kit(kit, tmp_path / "config.yaml", tmp_path / "model.json", splits)
    assert (kit / "model" / "config.json").exists() and (kit / "splits").is_dir()
    assert not list((kit / "model").glob("*.safetensors")), "a kit carries no weights"

    result = run_guarded([sys.executable, str(BENCH), "--kit", str(kit), "--run", "r4-qv-nf4", "--steps", "2",
                          "--rounds", "1", "--sides", "ours", "trainer", "--threads", "1"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    weights = kit / "model" / "model.safetensors"
    assert (kit / "model" / "random_weights.txt").exists() and weights.exists()
    drawn_at = weights.stat().st_mtime_ns
    assert bench_module().ensure_weights(kit) and weights.stat().st_mtime_ns == drawn_at, "drawn once, then reused"
    assert not [item for item in kit.iterdir() if item.name.startswith("tmp")], "no scratch folder left"
    out = result.stdout
    assert "weights: random (seed 0)" in out and "get_cpu_capability()" in out
    rounds = [json.loads(line.split(maxsplit=3)[3]) for line in out.splitlines() if line.startswith("round 1 ")]
    assert len(rounds) == 2
    for outcome in rounds:
        assert outcome["device"] == "cpu" and outcome["memory_kind"] == "peak RSS GB"
        assert outcome["peak_gb"] > 0 and outcome["loss_tokens"] > 0 and outcome["train_s"] > 0
    assert "r4-qv-nf4, 2 steps, 1 rounds on cpu" in out and "ratio ours/trainer: useful tokens/s x" in out
