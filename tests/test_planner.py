"""The memory planner against real components: bitsandbytes' own quantized tensors
and autograd's own saved tensors on a real forward pass."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lora_study.study.modules import Targets
from lora_study.training.planner import (
    BatchShape,
    largest_batch,
    lora_params,
    model_facts,
    plan_study,
    saved_activation_bytes,
    weights_bytes,
)


def default_training(**changes):
    from lora_study.study.config import validate_config
    from lora_study.study.settings import TrainingSettings

    config = validate_config({"model": {"source": "x"}, "dataset": {"source": "generated"}, "sweep": {}})
    return TrainingSettings.from_dict({**config["training"], **changes})


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
    "quantization, double_quant, compute",
    [("nf4", True, "bf16"), ("nf4", False, "fp32"), ("int8", False, "bf16"), ("bf16", False, None),
     ("fp32", False, None)],
)  # fmt: skip
def test_predicted_weights_match_what_the_recipe_holds(tiny_llama, quantization, double_quant, compute):
    """The planner's weights against a model loaded and cast by the training code itself."""
    from lora_study.training.loading import add_lora, load_base_model
    from lora_study.training.precision import DeviceCapability, recipe_for

    recipe = recipe_for(quantization, compute, DeviceCapability("cpu", "test", "AVX512", ("avx512_bf16",)))
    manifest = {"path": str(tiny_llama), "trust_remote_code": False}
    model = load_base_model(manifest, recipe, double_quant, "sdpa", torch.device("cpu"))
    model = add_lora(model, recipe, Targets(["q_proj", "v_proj"]), 4, 8, 0.0, gradient_checkpointing=False)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary tables: not weights
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    facts = model_facts(AutoConfig.from_pretrained(tiny_llama))
    predicted = weights_bytes(facts, recipe, double_quant)
    assert predicted == pytest.approx(held_bytes(model) - buffers - lora, rel=0.01)


@pytest.mark.parametrize("quantization, compute", [("nf4", "bf16"), ("int8", "bf16"), ("bf16", None)])
def test_moe_experts_are_held_in_the_compute_dtype_as_predicted(tiny_llama, tmp_path, quantization, compute):
    """Mixtral's 3-D expert weights: not quantized, not upcast to fp32; the planner counts them so."""
    from conftest import build_tiny_family
    from lora_study.study.modules import ARCHITECTURES, linear_layer_names, resolve_targets
    from lora_study.training.loading import add_lora, load_base_model
    from lora_study.training.precision import DeviceCapability, recipe_for

    model_dir = build_tiny_family(tmp_path / "mixtral", "mixtral", tiny_llama)
    recipe = recipe_for(quantization, compute, DeviceCapability("cpu", "test", "AVX512", ("avx512_bf16",)))
    manifest = {"path": str(model_dir), "trust_remote_code": False}
    model = load_base_model(manifest, recipe, True, "sdpa", torch.device("cpu"))
    targets = resolve_targets(ARCHITECTURES["mixtral"], ["q", "v", "mlp"], linear_layer_names(model), "mixtral")
    model = add_lora(model, recipe, targets, 4, 8, 0.0, gradient_checkpointing=False)
    experts = [p for n, p in model.named_parameters() if p.dim() == 3 and "lora_" not in n]
    assert experts and all(p.dtype == torch.bfloat16 for p in experts)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    config = AutoConfig.from_pretrained(model_dir)
    assert lora == 4 * lora_params(config, targets, 4)  # fp32 LoRA weights, counted on the meta device
    predicted = weights_bytes(model_facts(config), recipe, True)
    assert predicted == pytest.approx(held_bytes(model) - buffers - lora, rel=0.01)


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
    counted, _ = saved_activation_bytes(config, Targets(list(targets)), 8, 0.1, "float32", False, "eager", 4, 48)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), lora_dropout=0.1))
    model.train()
    assert counted == pytest.approx(real_saved_bytes(model, 4, 48), rel=0.10)


@pytest.mark.parametrize("quantization", ["nf4", "bf16"])
def test_activations_under_the_recipe_match_the_training_model(tiny_llama, quantization):
    """The meta pass under a bf16 recipe (autocast, fp32 norms and LoRA, 4-bit layers returning their input's
    dtype) against the model training builds, run under the recipe's autocast: a 4-bit model saves its MLP
    activations in fp32 behind the fp32 norms, a 16-bit one in bf16, and the plan must tell them apart."""
    from lora_study.training.loading import add_lora, load_base_model
    from lora_study.training.precision import DeviceCapability, recipe_for

    recipe = recipe_for(quantization, "bf16", DeviceCapability("cpu", "test", "AVX512", ("avx512_bf16",)))
    targets = Targets(["q_proj", "v_proj"])
    manifest = {"path": str(tiny_llama), "trust_remote_code": False}
    model = load_base_model(manifest, recipe, True, "sdpa", torch.device("cpu"))
    model = add_lora(model, recipe, targets, 4, 8, 0.0, gradient_checkpointing=False)
    model.train()
    config = AutoConfig.from_pretrained(tiny_llama)
    counted, _ = saved_activation_bytes(config, targets, 4, 0.0, "bfloat16", False, "sdpa", 4, 48, recipe=recipe)
    with recipe.autocast_context("cpu"):
        real = real_saved_bytes(model, 4, 48)
    assert counted == pytest.approx(real, rel=0.10)


def test_the_largest_batch_is_the_one_the_run_will_draw():
    lengths = [10] * 63 + [100]
    prompts = [8] * 63 + [90]
    training = default_training(batch_size=8, seed=0, group_by_length=False, max_steps=8, epochs=None,
                                gradient_accumulation_steps=1)  # fmt: skip
    # Eight steps of eight rows cover the whole epoch: the long row is drawn.
    assert largest_batch(lengths, prompts, training) == BatchShape(8, 100, 7 * 2 + 10)
    # One step sees only its own eight rows.
    one_step = largest_batch(lengths, prompts, training.replace(max_steps=1))
    assert one_step.rows == 8 and one_step.padded_length in (10, 100)


def test_a_run_the_planner_fails_on_keeps_no_prediction_and_never_stops_the_others(tiny_llama):
    """One run's targets break the meta-device pass: that run is unplanned, the others are planned."""
    from lora_study.study.budget import budget_verdict
    from lora_study.study.sweep import RunSpec

    config = AutoConfig.from_pretrained(tiny_llama)
    training = default_training(max_steps=2, batch_size=2)
    runs = [RunSpec(name, 4, 8.0, ("q", "v"), "nf4", True, training) for name in ("good", "broken")]
    targets = {"good": Targets(["q_proj", "v_proj"]), "broken": Targets(["no_such_layer"])}
    plans = {plan.run_id: plan for plan in plan_study(runs, config, targets, [20] * 8, [10] * 8, "cpu", 0.001)}
    assert plans["good"].plan_error == "" and plans["good"].skip  # planned, and over the tiny budget
    assert "no_such_layer" in plans["broken"].plan_error
    assert math.isnan(plans["broken"].predicted_gb) and not plans["broken"].skip
    settings = {"device": "cpu", "memory_budget_gb": 0.001}
    assert budget_verdict(plans["broken"].to_dict(), settings) is None  # no prediction: it trains
    assert budget_verdict({"predicted_cpu_gb": ""}, settings) is None  # as plan.csv writes a missing value


def mapped_bytes(directory) -> int:
    """Resident bytes of this process's mappings of the safetensors files in `directory` (/proc/self/smaps)."""
    total, mapping = 0, ""
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:
                mapping = fields[-1] if len(fields) >= 6 else ""
            elif line.startswith("Rss:") and mapping.startswith(str(directory)) and mapping.endswith(".safetensors"):
                total += int(fields[1]) * 1024
    return total


@pytest.mark.parametrize("quantization, compute", [("nf4", "fp32"), ("fp32", None), ("nf4", "bf16"), ("bf16", None)])
def test_the_checkpoint_stays_mapped_exactly_when_the_recipe_keeps_its_dtype(tiny_llama, tmp_path, quantization,
                                                                          compute):  # fmt: skip
    """The CPU plan counts the memory-mapped checkpoint files only where the loaded weights stay views of them:
    the recipe loads weights in the dtype the files store (fp32 here), so nothing copies them."""
    import gc
    import shutil

    tiny_llama = shutil.copytree(tiny_llama, tmp_path / "model")  # files no other test's model maps

    from lora_study.training.loading import load_base_model
    from lora_study.training.planner import checkpoint_files
    from lora_study.training.precision import DeviceCapability, recipe_for

    recipe = recipe_for(quantization, compute, DeviceCapability("cpu", "test", "AVX512", ("avx512_bf16",)))
    manifest = {"path": str(tiny_llama), "trust_remote_code": False}
    checkpoint = checkpoint_files(manifest)
    assert checkpoint.dtype == "fp32" and checkpoint.bytes > 0
    gc.collect()
    model = load_base_model(manifest, recipe, True, "sdpa", torch.device("cpu"))
    gc.collect()
    still_mapped = mapped_bytes(tiny_llama) > 0
    assert still_mapped == checkpoint.shared_by(recipe), (quantization, compute, mapped_bytes(tiny_llama))
    del model


@pytest.mark.parametrize("quantization", ["nf4", "fp32"])
def test_a_sharded_run_is_planned_per_rank(tiny_llama, quantization):
    """N ranks: each holds 1/N of the weights and the LoRA states plus what FSDP gathers whole (the root unit and
    two decoder layers), its share of the batch's activations, and full logits for its rows."""
    from lora_study.study.sweep import RunSpec
    from lora_study.training.planner import gathered_bytes, logits_bytes, plan_run, planning_recipe

    config = AutoConfig.from_pretrained(tiny_llama)
    facts = model_facts(config)
    batch = BatchShape(rows=4, padded_length=32, loss_positions=40)
    plans = {}
    for gpus in (1, 2, 4):
        run = RunSpec("r4", 4, 8.0, ("q", "v"), quantization, quantization == "nf4",
                      default_training(batch_size=4, gpus=gpus))  # fmt: skip
        recipe = planning_recipe(run, "cuda")
        plans[gpus] = plan_run(run, recipe, config, facts, Targets(["q_proj", "v_proj"]), batch, "cuda", None)
    one = plans[1]
    weights = weights_bytes(facts, recipe, quantization == "nf4") / 2**30
    assert one.gpus == 1 and one.gathered_gb == 0 and one.weights_gb == pytest.approx(weights)
    for gpus in (2, 4):
        plan = plans[gpus]
        gathered = gathered_bytes(facts, recipe, weights * 2**30, config) / 2**30
        assert plan.gpus == gpus and gathered > 0 and plan.gathered_gb == pytest.approx(gathered)
        assert plan.weights_gb == pytest.approx(weights / gpus + gathered)
        assert plan.lora_states_gb == pytest.approx(one.lora_states_gb / gpus)
        assert plan.activations_gb == pytest.approx(one.activations_gb / gpus)  # 4 rows: 4 / gpus each
        head_bytes = 4 if recipe.compute_dtype == "fp32" else 2
        full_logits = logits_bytes(4 // gpus * 32, facts.vocab_size, head_bytes) / 2**30
        assert plan.logits_gb == pytest.approx(full_logits)
    # A model of two decoder layers gathers all of them: sharding it saves only the states and activations.
    assert plans[2].weights_gb >= one.weights_gb


def test_auto_takes_the_fewest_devices_whose_prediction_fits_the_budget(tiny_llama):
    """Every run is planned on 1, 2, 4 and 8 devices (where it can be sharded); `gpus: auto` takes the fewest
    that fit the budget, and a run that fits on none is skipped with its smallest prediction."""
    from lora_study.study.budget import auto_gpus, budget_verdict, gpus_needed, per_gpu_column
    from lora_study.study.sweep import RunSpec

    config = AutoConfig.from_pretrained(tiny_llama, num_hidden_layers=16)  # enough layers for sharding to pay
    lengths, prompts = [64] * 16, [8] * 16

    def plan(gpus, budget, method="full", batch_size=4):
        training = default_training(batch_size=batch_size, max_steps=2, gpus=gpus)
        run = RunSpec("run", 4, 8.0, ("q", "v"), "fp32", False, training, method=method)
        (result,) = plan_study([run], config, {"run": Targets(["q_proj", "v_proj"])}, lengths, prompts, "cuda", budget)
        return result

    free = plan(1, None)
    per_gpu = [free.per_gpu_gb[per_gpu_column("cuda", gpus)] for gpus in (1, 2, 4)]
    assert per_gpu[0] == pytest.approx(free.predicted_cuda_gb) and per_gpu[0] > per_gpu[1] > per_gpu[2]
    assert math.isnan(free.per_gpu_gb[per_gpu_column("cuda", 8)])  # a batch of 4 rows cannot feed 8 devices
    budget = (per_gpu[0] + per_gpu[1]) / 2
    chosen = plan("auto", budget)
    assert chosen.gpus == 2 and not chosen.skip and chosen.predicted_cuda_gb == pytest.approx(per_gpu[1])
    assert gpus_needed(chosen.to_dict(), "cuda", budget) == 2
    settings = {"device": "cuda", "memory_budget_gb": budget}
    assert auto_gpus(chosen.to_dict(), settings) == 2 and budget_verdict(chosen.to_dict(), settings, 2) is None
    assert plan("auto", None).gpus == 1  # no budget: one device
    too_small = plan("auto", per_gpu[2] / 2)
    assert too_small.gpus == 4 and too_small.skip  # the least any layout needs, still over: skipped
    # A method that trains on one device only is never sharded by auto.
    assert plan("auto", budget, method="pissa").gpus == 1


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_the_activation_pass_counts_the_trainable_parameters_as_lora_params(tiny_llama, method, checkpointing):
    """A plan's activation pass builds the run's LoRA model anyway; the trainable parameters it records (so the
    plan builds no second one) are the count lora_params makes on its own model."""
    from lora_study.training import planner
    from lora_study.training.precision import DeviceCapability, recipe_for

    config = AutoConfig.from_pretrained(tiny_llama)
    targets = Targets(["q_proj", "v_proj", "down_proj"])
    recipe = recipe_for("nf4", "fp32", DeviceCapability("cpu", "test", "AVX2", ()))
    layer_ranks = (("q_proj", 8),)
    # Both caches empty: a pass cached by an earlier test (a checkpointed plan computes the plain one too) would
    # build no model, and record nothing.
    planner._LORA_PARAMS_CACHE.clear()
    planner._ACTIVATION_CACHE.clear()
    saved_activation_bytes(config, targets, 4, 0.0, "float32", checkpointing, "sdpa", 2, 16, method, recipe,
                           layer_ranks)  # fmt: skip
    recorded = dict(planner._LORA_PARAMS_CACHE)
    planner._LORA_PARAMS_CACHE.clear()
    counted = lora_params(config, targets, 4, method, layer_ranks)
    assert recorded == {planner._lora_params_key(config, targets, 4, method, layer_ranks): counted}
    assert counted > lora_params(config, targets, 4, method) > 0  # the rank pattern is in the count
