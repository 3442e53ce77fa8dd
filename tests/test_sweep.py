import copy

import pytest
import yaml

from conftest import REPO
from lora_study.study.config import ConfigError, validate_config
from lora_study.study.sweep import RunSpec, all_evaluated, expand_study, run_id


def default_config() -> dict:
    return validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))


def config_with_sweep(sweep: dict) -> dict:
    return validate_config({"model": {"source": "x"}, "dataset": {"source": "generated"}, "sweep": sweep})


def test_default_config_reproduces_the_reference_sweeps():
    runs = expand_study(default_config())
    assert list(runs) == [
        "r4-qkvo-nf4",
        "r8-qkvo-nf4",
        "r16-qkvo-nf4",
        "r32-qkvo-nf4",
        "r64-qkvo-nf4",
        "r16-qv-nf4",
        "r16-qkv-nf4",
        "r16-qkvo-mlp-nf4",
        "r16-qkvo-int8",
        "r16-qkvo-16bit",
        "r16-qkvo-nf4-s1",  # noise replicates of the centre configuration
        "r16-qkvo-nf4-s2",
    ]
    assert [(runs[r].config_id, runs[r].training.seed) for r in ("r16-qkvo-nf4-s1", "r16-qkvo-nf4-s2")] == [
        ("r16-qkvo-nf4", 1), ("r16-qkvo-nf4", 2)]  # fmt: skip
    assert runs["r16-qkvo-nf4"].alpha == 32
    assert runs["r16-qkvo-nf4"].double_quant is True
    assert runs["r16-qkvo-int8"].double_quant is False  # only 4-bit has it
    # One base model per weight format, first; compute_dtype only where it applies.
    assert list(all_evaluated(default_config()))[:3] == ["base-nf4", "base-int8", "base-16bit"]
    assert runs["r16-qkvo-nf4"].training.compute_dtype == "auto"
    assert runs["r16-qkvo-16bit"].training.compute_dtype is None
    assert "compute_dtype" not in runs["r16-qkvo-16bit"].as_params()["training"]


def test_a_run_survives_its_params_and_a_misspelt_setting_fails_at_once():
    spec = expand_study(default_config())["r16-qkvo-nf4"]
    assert RunSpec.from_params(spec.as_params()) == spec
    params = spec.as_params()
    params["training"]["learning_rte"] = 1e-3
    with pytest.raises(ConfigError, match="unknown training settings \\['learning_rte'\\]"):
        RunSpec.from_params(params)


def test_baseline_quantization_is_replaced_by_one_base_per_format():
    config = {"model": {"source": "x"}, "dataset": {"source": "generated"}, "sweep": {"baseline_quantization": "fp32"}}
    with pytest.raises(ConfigError, match="baseline_quantization' was removed"):
        validate_config(config)
    grid = {"quantization": ["nf4", "fp32"], "double_quant": [True, False]}
    runs = all_evaluated(config_with_sweep({"grids": [grid]}))
    assert [r for r in runs if r.startswith("base")] == ["base-nf4", "base-nf4-nodq", "base-fp32"]
    assert runs["r16-qkvo-nf4-nodq"].baseline_id == "base-nf4-nodq"


def test_ids_name_alpha_only_when_not_twice_the_rank_and_mark_no_double_quant():
    assert run_id(16, 32, ("q", "v"), "nf4", True) == "r16-qv-nf4"
    assert run_id(16, 16, ("q", "v"), "nf4", True) == "r16-a16-qv-nf4"
    assert run_id(8, 4.5, ("q",), "fp4", False) == "r8-a4.5-q-fp4-nodq"
    assert run_id(8, 16, ("all-linear",), "bf16", False) == "r8-all-bf16"
    assert run_id(8, 16, ("q", "dense"), "fp16", False) == "r8-q-dense-fp16"


def test_grid_is_a_cross_product_with_alpha_rules():
    runs = expand_study(
        config_with_sweep({"grids": [{"rank": [4, 8], "alpha": ["2r", 16, "1r"], "quantization": ["nf4", "bf16"]}]})
    )
    assert len(runs) == 2 * 3 * 2 - 2  # "2r" and 16 coincide at rank 8
    assert runs["r4-a4-qkvo-nf4"].alpha == 4.0


def test_module_order_in_config_does_not_change_the_id():
    a = expand_study(config_with_sweep({"grids": [{"modules": [["v", "q"]]}]}))
    b = expand_study(config_with_sweep({"grids": [{"modules": [["q", "v"]]}]}))
    assert list(a) == list(b) == ["r16-qv-nf4"]
    assert a["r16-qv-nf4"].modules == ("q", "v")


def test_identical_runs_from_two_grids_merge():
    runs = expand_study(config_with_sweep({"grids": [{"rank": [8, 16]}, {"rank": [16, 32]}]}))
    assert list(runs) == ["r8-qkvo-nf4", "r16-qkvo-nf4", "r32-qkvo-nf4"]


def test_named_runs_override_training_defaults():
    config = config_with_sweep({"runs": [{"id": "fast-lr", "rank": 8, "training": {"learning_rate": 0.01}}]})
    spec = expand_study(config)["fast-lr"]
    assert spec.training.learning_rate == 0.01
    assert spec.training.batch_size == config["training"]["batch_size"]


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"grids": [{"rank": [8]}], "runs": [{"rank": 8}]}, "duplicate run id 'r8-qkvo-nf4'"),
        ({"runs": [{"id": "a"}, {"id": "a", "rank": 4}]}, "duplicate run id 'a'"),
        ({"runs": [{"id": "base"}]}, "name the baselines"),
        ({"runs": [{"id": "base-nf4"}]}, "name the baselines"),
        ({}, "no runs"),
        ({"grids": []}, "no runs"),
        ({"grids": [{"modules": [["all-linear", "q"]]}]}, "cannot be combined"),
    ],
)
def test_bad_sweeps_fail_with_one_clear_message(sweep, message):
    with pytest.raises(ConfigError, match=message):
        expand_study(config_with_sweep(copy.deepcopy(sweep)))


def test_a_compute_dtype_that_cannot_apply_is_dropped_with_a_warning(caplog):
    run = {"id": "full", "quantization": "fp32", "training": {"compute_dtype": "bf16"}}
    config = config_with_sweep({"runs": [run]})
    spec = expand_study(config)["full"]
    assert spec.training.compute_dtype is None
    assert "sweep.runs[0]: training.compute_dtype does not apply to fp32 weights" in caplog.text


def test_any_training_setting_is_a_grid_axis():
    grid = {
        "rank": [8],
        "training": {"learning_rate": [2e-4, 1e-3], "batch_size": [4, 8], "gradient_checkpointing": [True]},
    }
    runs = expand_study(config_with_sweep({"grids": [grid]}))
    # 1e-3 and 8 are the schema's defaults: no suffix; everything else is named.
    assert list(runs) == ["r8-qkvo-nf4-lr2e-4-bs4-gc", "r8-qkvo-nf4-lr2e-4-gc", "r8-qkvo-nf4-bs4-gc", "r8-qkvo-nf4-gc"]
    spec = runs["r8-qkvo-nf4-lr2e-4-bs4-gc"].training
    assert (spec.learning_rate, spec.batch_size, spec.gradient_checkpointing) == (2e-4, 4, True)
    assert runs["r8-qkvo-nf4-gc"].training.learning_rate == 1e-3


def test_editing_a_shared_default_renames_no_run():
    sweep = {"grids": [{"rank": [8, 16], "training": {"learning_rate": [3e-4, 1e-3]}, "method": ["lora", "dora"]}]}
    before = expand_study(config_with_sweep(copy.deepcopy(sweep)))
    edited = config_with_sweep(copy.deepcopy(sweep))
    edited["training"].update(learning_rate=5e-4, batch_size=4, lora_dropout=0.0)
    after = expand_study(edited)
    assert list(after) == list(before)
    assert "r8-qkvo-nf4-dora-lr3e-4" in after
    # The shared block changes what the runs compute, not their names.
    assert after["r8-qkvo-nf4-dora-lr3e-4"].training.batch_size == 4


def test_methods_name_runs_and_get_their_alpha_defaults():
    grid = {"rank": [4, 16], "method": ["lora", "rslora", "pissa", "full"], "quantization": ["16bit"]}
    runs = expand_study(config_with_sweep({"grids": [grid]}))
    assert list(runs) == ["r4-qkvo-16bit", "r4-qkvo-16bit-rslora", "r4-qkvo-16bit-pissa", "full-16bit",
                          "r16-qkvo-16bit", "r16-qkvo-16bit-rslora", "r16-qkvo-16bit-pissa"]  # fmt: skip
    assert runs["r16-qkvo-16bit"].alpha == 32 and runs["r16-qkvo-16bit-rslora"].alpha == 8
    full = runs["full-16bit"]
    assert (full.rank, full.modules, full.training.learning_rate) == (0, (), 1e-4)  # methods.full's default
    # An explicit alpha that is not the method's default is named.
    named = expand_study(config_with_sweep({"runs": [{"method": "rslora", "alpha": "2r", "quantization": "16bit"}]}))
    assert list(named) == ["r16-a32-qkvo-16bit-rslora"]
    # Plain LoRA params carry no method key: studies from before the axis keep their params.
    assert "method" not in runs["r4-qkvo-16bit"].as_params()
    assert RunSpec.from_params(runs["full-16bit"].as_params()) == full


PATTERNS = {"qheavy": {"ranks": {"q_proj": 32}, "alphas": {"q_proj": 64}}, "early": {"ranks": {r"layers\.0\..*": 4}}}


def config_with_patterns(sweep: dict, patterns: dict = PATTERNS) -> dict:
    return validate_config({"model": {"source": "x"}, "dataset": {"source": "generated"},
                            "rank_patterns": copy.deepcopy(patterns), "sweep": sweep})  # fmt: skip


def test_rank_patterns_are_an_axis_named_in_the_id_whose_content_is_in_the_params():
    sweep = {"grids": [{"rank_pattern": [None, "qheavy", "early"]}],
             "runs": [{"rank": 8, "rank_pattern": "early", "method": "dora"}]}  # fmt: skip
    runs = expand_study(config_with_patterns(sweep))
    assert list(runs) == ["r16-qkvo-nf4", "r16-qkvo-nf4-rpqheavy", "r16-qkvo-nf4-rpearly", "r8-qkvo-nf4-dora-rpearly"]
    patterned = runs["r16-qkvo-nf4-rpqheavy"]
    assert patterned.lora_patterns == {"rank_pattern": {"q_proj": 32}, "alpha_pattern": {"q_proj": 64}}
    assert runs["r16-qkvo-nf4-rpearly"].lora_patterns == {"rank_pattern": {r"layers\.0\..*": 4}, "alpha_pattern": {}}
    assert RunSpec.from_params(patterned.as_params()) == patterned
    # A uniform run's params carry no pattern keys (studies from before keep theirs); a patterned run's carry the
    # pattern itself, so editing it retrains exactly the runs that use it.
    assert not {"rank_pattern", "layer_ranks", "layer_alphas"} & set(runs["r16-qkvo-nf4"].as_params())
    edited = expand_study(config_with_patterns({"grids": [{"rank_pattern": [None, "qheavy"]}]},
                                               {**PATTERNS, "qheavy": {"ranks": {"q_proj": 8}}}))  # fmt: skip
    assert edited["r16-qkvo-nf4"].as_params() == runs["r16-qkvo-nf4"].as_params()
    assert edited["r16-qkvo-nf4-rpqheavy"].as_params() != patterned.as_params()


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"grids": [{"rank_pattern": ["wide"]}]}, r"rank_pattern 'wide' is not in the config's rank_patterns"),
        ({"grids": [{"rank_pattern": ["qheavy"], "method": ["eva"]}]}, "which computes its own per-layer ranks"),
        ({"runs": [{"rank_pattern": "early", "method": "full", "quantization": "16bit"}]}, "which trains every weight"),
    ],
)  # fmt: skip
def test_a_rank_pattern_that_cannot_apply_fails_at_start(sweep, message):
    with pytest.raises(ConfigError, match=message):
        expand_study(config_with_patterns(sweep))


def test_schema_rejects_a_rank_pattern_without_ranks_or_alphas_or_with_a_bad_name():
    with pytest.raises(ConfigError, match="rank_patterns"):
        config_with_patterns({}, {"empty": {}})
    with pytest.raises(ConfigError, match="rank_patterns"):
        config_with_patterns({}, {"q-heavy": {"ranks": {"q_proj": 8}}})


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"grids": [{"training": {"seed": [0, 1]}}]}, r"'sweep.grids\[0\].training.seed': seeds are replicates"),
        ({"grids": [{"method": ["pissa"], "quantization": ["nf4"]}]}, "pissa initialises the adapter from the base"),
        ({"runs": [{"method": "olora", "quantization": "int8"}]}, "olora initialises the adapter"),
        ({"grids": [{"method": ["full"], "quantization": ["nf4"]}]}, "full fine-tuning trains every weight"),
        # A swept value equal to the schema default, against a named run with the shared value: one id.
        ({"grids": [{"training": {"learning_rate": [1e-3]}}], "runs": [{"training": {"learning_rate": 1e-3}}]},
         "duplicate run id 'r16-qkvo-nf4'"),
    ],
)  # fmt: skip
def test_bad_axes_and_methods_fail_at_start(sweep, message):
    with pytest.raises(ConfigError, match=message):
        expand_study(config_with_sweep(copy.deepcopy(sweep)))


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"training": {"learning_rate": ["fast"]}}, r"'sweep.grids\[0\].training.learning_rate\[0\]': 'fast' is not"),
        ({"training": {"learnig_rate": [1e-3]}}, r"'sweep.grids\[0\].training': Additional properties"),
        ({"training": {"batch_size": []}}, r"'sweep.grids\[0\].training.batch_size': \[\] should be non-empty"),
        ({"method": ["qlora"]}, r"'sweep.grids\[0\].method\[0\]': 'qlora' is not one of"),
    ],
)
def test_schema_rejects_a_bad_axis_value_naming_the_key(grid, message):
    with pytest.raises(ConfigError, match=message):
        config_with_sweep({"grids": [grid]})


def test_a_grid_value_and_a_named_run_that_differ_in_training_explain_the_clash():
    sweep = {"grids": [{"training": {"learning_rate": [1e-3]}}], "runs": [{"training": {"max_steps": 24}}]}
    config = config_with_sweep(sweep)
    config["training"]["learning_rate"] = 2e-4
    with pytest.raises(ConfigError, match=r"differ in training.learning_rate \(0.001 vs 0.0002\)"):
        expand_study(config)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_a_grid_cell_repeating_a_run_under_another_id_trains_once_whatever_the_grid_order(order):
    # The shared learning rate is 2e-4; the lr axis repeats it: r16-qkvo-nf4 and r16-qkvo-nf4-lr2e-4 are one run.
    grids = [{"rank": [16]}, {"rank": [16], "training": {"learning_rate": [2e-4, 5e-4]}}]
    config = config_with_sweep({"grids": [grids[i] for i in order]})
    config["training"]["learning_rate"] = 2e-4
    assert set(expand_study(config)) == {"r16-qkvo-nf4", "r16-qkvo-nf4-lr5e-4"}
    # A swept schema default (1e-3) and the shared 2e-4 would share a name: refused in either order.
    clash = [{"rank": [16]}, {"rank": [16], "training": {"learning_rate": [2e-4, 1e-3]}}]
    config = config_with_sweep({"grids": [clash[i] for i in order]})
    config["training"]["learning_rate"] = 2e-4
    with pytest.raises(ConfigError, match=r"duplicate run id 'r16-qkvo-nf4'.*differ in training\.learning_rate"):
        expand_study(config)


@pytest.mark.parametrize(
    "value, text",
    [(2e-4, "2e-4"), (1.5e-5, "1.5e-5"), (0.05, "0.05"), (16, "16"), (1e-3, "1e-3"), (1.00000001e-4, "1.00000001e-4"),
     (1e20, "1e20"), (0.5, "0.5"), (3.0, "3")],
)  # fmt: skip
def test_numbers_in_ids_are_short_and_exact(value, text):
    from lora_study.study.sweep import compact_number

    assert compact_number(value) == text


def test_settings_a_named_full_finetuning_run_cannot_use_are_named_in_a_warning(caplog):
    runs = [{"method": "full", "quantization": "16bit", "rank": 64, "training": {"lora_dropout": 0.1}}]
    spec = expand_study(config_with_sweep({"runs": runs}))["full-16bit"]
    assert spec.rank == 0
    assert "sweep.runs[0]: rank, training.lora_dropout do not apply to full fine-tuning" in caplog.text


def test_noise_replicates_replicate_the_named_or_centre_configuration_only():
    config = default_config()
    config["sweep"]["noise_reference"] = "r8-qkvo-nf4"
    runs = expand_study(config)
    assert [r for r in runs if runs[r].config_id != r] == ["r8-qkvo-nf4-s1", "r8-qkvo-nf4-s2"]
    config["sweep"]["noise_replicates"] = 1
    assert all(spec.config_id == run_id for run_id, spec in expand_study(config).items())
    config["sweep"]["noise_replicates"], config["sweep"]["noise_reference"] = 3, "r7-qkvo-nf4"
    with pytest.raises(ConfigError, match="'r7-qkvo-nf4' is not a run of this study"):
        expand_study(config)
    # With seeds for every configuration the replicates are not needed: each configuration gets its seeds only.
    config["sweep"]["noise_reference"], config["sweep"]["seeds"] = None, [0, 1]
    assert len(expand_study(config)) == 2 * 10


def test_every_run_id_of_the_shipped_configs_fits_the_run_wildcards_pattern():
    """Rule wildcards take {run} by RUN_ID_PATTERN (no "/"): every generated id fits it, and named ids are held to
    the same pattern by the schema."""
    import re

    from lora_study.study.config import load_schema
    from lora_study.study.sweep import RUN_ID_PATTERN

    named = load_schema()["properties"]["sweep"]["properties"]["runs"]["items"]["properties"]["id"]["pattern"]
    assert named == f"^{RUN_ID_PATTERN}$"
    configs = sorted((REPO / "config").glob("*.yaml"))
    ids = [run_id for path in configs if path.name != "schema.yaml"
           for run_id in all_evaluated(validate_config(yaml.safe_load(path.read_text())))]  # fmt: skip
    assert len(ids) > 100 and all(re.fullmatch(RUN_ID_PATTERN, run_id) for run_id in ids)
    patterned = expand_study(config_with_patterns({"grids": [{"rank_pattern": ["qheavy"], "alpha": [0.5]}]}))
    assert all(re.fullmatch(RUN_ID_PATTERN, run_id) for run_id in patterned)
