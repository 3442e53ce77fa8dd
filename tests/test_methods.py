"""The method axis on real (tiny) models: PEFT flags on the built model, PiSSA/OLoRA conversion, full
fine-tuning, adapter anatomy on constructed updates, and a whole methods study through the workflow."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_snakemake
from lora_study.measure.anatomy import adapter_updates, effective_rank
from lora_study.study.config import training_defaults
from lora_study.study.methods import CONVERTED_METHODS, PEFT_FLAGS, RSLORA
from lora_study.study.modules import Targets, layout_for
from lora_study.study.settings import TrainingSettings
from lora_study.training.loading import add_lora, load_base_model, load_for_evaluation, prepare_full
from lora_study.training.loop import save_initial_adapter, save_trained
from lora_study.training.planner import lora_params, model_facts, plan_run, saved_activation_bytes
from lora_study.training.precision import detect_capability, recipe_for

CPU = torch.device("cpu")
TARGETS = Targets(["q_proj", "v_proj"])


@pytest.fixture
def manifest(tiny_llama) -> dict:
    return {"path": str(tiny_llama), "trust_remote_code": False}


def fp32_recipe(full: bool = False):
    return recipe_for("fp32", None, detect_capability(CPU), full=full)


def adapted(manifest, method: str, rank: int = 4, alpha: float = 8.0):
    model = load_base_model(manifest, fp32_recipe(), False, "sdpa", CPU)
    calibration = [batch(model.config.vocab_size, seed) for seed in (1, 2)]  # CorDA's and LoRA-GA's batches
    return add_lora(model, fp32_recipe(), TARGETS, rank, alpha, 0.0, False, method, lambda: calibration)


def batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 24), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def as_if_trained(model, seed: int) -> None:
    """Random lora_B (PEFT starts it at zero): an adapter with updates, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def loss_of(model, inputs) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**inputs).loss)


def train_steps(model, inputs, steps: int = 4, lr: float = 2e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "pissa", "olora", "corda", "lora_ga"])
def test_each_method_reaches_peft_with_its_flags(manifest, method):
    model = adapted(manifest, method)
    config = model.peft_config["default"]
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert config.use_dora is (method == "dora")
    assert config.use_rslora is (method == RSLORA)
    # The scale PEFT applies: alpha/sqrt(r) for rsLoRA, alpha/r otherwise.
    assert layer.scaling["default"] == pytest.approx(8.0 / (2.0 if method == RSLORA else 4.0))
    assert ("default" in layer.lora_magnitude_vector) is (method == "dora")
    base = load_base_model(manifest, fp32_recipe(), False, "sdpa", CPU).model.layers[0].self_attn.q_proj.weight
    moved = not torch.equal(layer.get_base_layer().weight, base)
    # PiSSA, OLoRA, CorDA and LoRA-GA move part of W into the adapter; the others leave W alone.
    assert moved is (method in CONVERTED_METHODS)
    if method in CONVERTED_METHODS:
        assert config.init_lora_weights == PEFT_FLAGS[method]["init_lora_weights"]
        # The adapted model starts as the base model: residual + A0 B0 == W.
        assert torch.allclose(layer.get_base_layer().weight + layer.get_delta_weight("default"), base, atol=1e-5)


@pytest.mark.parametrize("method", CONVERTED_METHODS)
def test_converted_adapter_on_the_original_base_equals_the_trained_model(manifest, tmp_path, method):
    model = adapted(manifest, method)
    initial = save_initial_adapter(model)
    inputs = batch(model.config.vocab_size)
    train_steps(model, inputs)
    trained_loss = loss_of(model, inputs)
    save_trained(model, tmp_path / "converted", initial)
    # The trained A, B as a plain LoRA adapter: what scoring it on the original base without conversion means.
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "unconverted")

    saved = yaml.safe_load((tmp_path / "converted" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True  # rank 2r, loads without decomposing again
    fresh = load_for_evaluation(manifest, fp32_recipe(), False, "sdpa", CPU, str(tmp_path / "converted"))
    assert loss_of(fresh, inputs) == pytest.approx(trained_loss, rel=1e-5)
    # Without the conversion the adapter scores against the wrong base.
    wrong = load_for_evaluation(manifest, fp32_recipe(), False, "sdpa", CPU, str(tmp_path / "unconverted"))
    assert abs(loss_of(wrong, inputs) - trained_loss) > 1e-3


def test_lora_ga_starts_at_the_gradients_top_singular_directions_and_corda_at_the_inputs_weighted_weight(manifest):
    """LoRA-GA's A rows are the top right singular vectors of each weight's gradient on the calibration batches
    (computed here independently); CorDA's adapter is not PiSSA's: the input covariance changes the directions."""
    base = load_base_model(manifest, fp32_recipe(), False, "sdpa", CPU)
    vocab = base.config.vocab_size
    for seed in (1, 2):  # adapted()'s calibration batches, the gradient summed over them
        base(**batch(vocab, seed)).loss.backward()
    gradient = base.model.layers[0].self_attn.q_proj.weight.grad / 2
    top = torch.linalg.svd(gradient.double(), full_matrices=False)[2][:4]
    lora_ga = adapted(manifest, "lora_ga").base_model.model.model.layers[0].self_attn.q_proj
    a = lora_ga.lora_A["default"].weight.detach().double()
    # The same subspace (svd_lowrank is randomised, so signs and near-equal directions may mix).
    assert torch.allclose(a @ a.T, torch.eye(4, dtype=torch.double), atol=1e-4)
    assert torch.linalg.matrix_norm(top @ a.T, ord=2) > 0.999 and torch.linalg.svdvals(top @ a.T).min() > 0.99

    def delta(method: str) -> torch.Tensor:
        return adapted(manifest, method).base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default")

    corda, pissa = delta("corda"), delta("pissa")
    assert corda.abs().max() > 1e-3 and not torch.allclose(corda, pissa, atol=1e-3)


def test_a_lora_ga_layer_peft_left_at_plain_initialisation_stops_the_run(manifest):
    """PEFT starts a LoRA-GA layer whose weight got no gradient like plain LoRA (B = 0), silently; the check
    passes a real LoRA-GA model and stops one whose layers hold LoRA's initialisation."""
    from lora_study.core.errors import UserError
    from lora_study.training.initialisation import check_initialised

    check_initialised(adapted(manifest, "lora_ga"), "lora_ga")
    with pytest.raises(UserError, match=r"4 adapted layer\(s\) got no gradient on the calibration batches"):
        check_initialised(adapted(manifest, "lora"), "lora_ga")


def test_loftq_starts_the_4bit_model_nearer_the_original_weights(manifest, tiny_llama):
    """LoftQ on an NF4 base: scale * B A is the top-r part of each layer's quantization error whatever alpha is,
    so every adapted weight and the model's logits start nearer the unquantized model than plain LoRA's."""
    from lora_study.training.initialisation import initialize_loftq

    recipe = recipe_for("nf4", "fp32", detect_capability(CPU))
    inputs = batch(400)
    with torch.no_grad():
        reference = load_base_model(manifest, fp32_recipe(), False, "sdpa", CPU)(input_ids=inputs["input_ids"]).logits
    distances = {}
    for method in ("lora", "loftq"):
        model = add_lora(load_base_model(manifest, recipe, True, "sdpa", CPU), recipe, TARGETS, 16, 32.0, 0.0,
                         False, method)  # fmt: skip
        if method == "loftq":
            errors = initialize_loftq(model, str(tiny_llama))
            assert len(errors) == 4 and all(0 < left < 0.95 for left in errors.values())
            layer = model.base_model.model.model.layers[0].self_attn.q_proj
            original = load_file(tiny_llama / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
            import bitsandbytes as bnb

            weight = layer.get_base_layer().weight
            quantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
            after = original - quantized - layer.get_delta_weight("default").detach()  # the delta includes scale 2
            assert float(after.norm() / (original - quantized).norm()) == pytest.approx(
                errors["base_model.model.model.layers.0.self_attn.q_proj"], rel=1e-4)  # fmt: skip
        model.eval()
        with torch.no_grad():
            distances[method] = float((model(input_ids=inputs["input_ids"]).logits - reference).abs().mean())
    assert distances["loftq"] < distances["lora"]


def test_a_rank_pattern_gives_its_layers_their_rank_and_alpha_and_the_planner_counts_them(manifest, tiny_llama):
    """PEFT's rank_pattern / alpha_pattern from a run's rank pattern: the matched layers get their rank and scale,
    the others the run's, and the planner's trainable count (meta device) is the built model's."""
    from transformers import AutoConfig

    patterns = {"rank_pattern": {"q_proj": 8, "layers.1.self_attn.v_proj": 2}, "alpha_pattern": {"q_proj": 4.0}}
    model = add_lora(load_base_model(manifest, fp32_recipe(), False, "sdpa", CPU), fp32_recipe(), TARGETS, 4, 8.0,
                     0.0, False, "lora", patterns=patterns)  # fmt: skip
    layers = model.base_model.model.model.layers
    assert (layers[0].self_attn.q_proj.r["default"], layers[0].self_attn.q_proj.scaling["default"]) == (8, 0.5)
    assert (layers[0].self_attn.v_proj.r["default"], layers[0].self_attn.v_proj.scaling["default"]) == (4, 2.0)
    assert (layers[1].self_attn.v_proj.r["default"], layers[1].self_attn.v_proj.scaling["default"]) == (2, 4.0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layer_ranks = tuple(patterns["rank_pattern"].items())
    assert lora_params(AutoConfig.from_pretrained(tiny_llama), TARGETS, 4, "lora", layer_ranks) == trainable
    assert lora_params(AutoConfig.from_pretrained(tiny_llama), TARGETS, 4) < trainable
    # A pattern matching no adapted layer (PEFT matches the end of the name) stops the run instead of training
    # the uniform rank under the pattern's name.
    from lora_study.core.errors import UserError

    with pytest.raises(UserError, match=r"rank_pattern 'layers\\.0\\.' matches no adapted layer"):
        add_lora(load_base_model(manifest, fp32_recipe(), False, "sdpa", CPU), fp32_recipe(), TARGETS, 4, 8.0, 0.0,
                 False, "lora", patterns={"rank_pattern": {r"layers\.0\.": 8}, "alpha_pattern": {}})  # fmt: skip


def test_initialisations_a_weight_format_cannot_take_are_refused_with_the_fix():
    from lora_study.study.methods import method_problem

    assert "use one of ['nf4', 'fp4'] for loftq" in method_problem("loftq", "16bit")
    assert method_problem("loftq", "nf4") is None
    for method in ("corda", "lora_ga"):
        assert "cannot do on bitsandbytes (nf4) weights" in method_problem(method, "nf4")
        assert method_problem(method, "fp32") is None


@pytest.mark.parametrize("method", ["pissa", "lora_ga"])
def test_a_resumed_converted_run_rebuilds_its_initialisation_and_converts_the_same(manifest, tmp_path, method):
    """LoRA-GA's randomised SVD draws from the RNG that train_run seeds before every load (here: by hand)."""
    from lora_study.training.checkpoints import Checkpointer, Progress

    def session():
        torch.manual_seed(0)
        model = adapted(manifest, method)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return model, optimizer, scheduler, save_initial_adapter(model)

    def step(model, optimizer, inputs):
        model.train()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    inputs = batch(128)
    whole, whole_opt, _, whole_init = session()
    for _ in range(4):
        step(whole, whole_opt, inputs)
    # The same run stopped after two steps and resumed in a new process (a fresh model, the same init).
    first, first_opt, first_sched, _ = session()
    for _ in range(2):
        step(first, first_opt, inputs)
    checkpointer = Checkpointer(tmp_path / "checkpoint", "fingerprint", every_steps=1)
    checkpointer.save(first, first_opt, first_sched, Progress(step=2))
    resumed, resumed_opt, resumed_sched, resumed_init = session()
    assert checkpointer.restore(resumed, resumed_opt, resumed_sched).step == 2
    for _ in range(2):
        step(resumed, resumed_opt, inputs)
    save_trained(whole, tmp_path / "whole", whole_init)
    save_trained(resumed, tmp_path / "resumed", resumed_init)
    a, b = (
        load_file(tmp_path / "whole/adapter_model.safetensors"),
        load_file(tmp_path / "resumed/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_full_finetuning_trains_every_parameter_in_fp32_under_autocast(manifest):
    recipe = recipe_for("bf16", None, detect_capability(CPU), full=True)
    assert (recipe.weight_format, recipe.compute_dtype, recipe.master_weights) == ("fp32", "bf16", True)
    model = prepare_full(load_base_model(manifest, recipe, False, "sdpa", CPU), False)
    params = dict(model.named_parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params.values())
    before = {name: p.detach().clone() for name, p in params.items()}
    inputs = batch(model.config.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with recipe.autocast_context("cpu"):
        logits = model(input_ids=inputs["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), inputs["labels"].flatten())
    assert logits.dtype == torch.bfloat16  # computed in bf16 ...
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in params.values())  # ... gradients for the fp32 masters
    optimizer.step()
    changed = [name for name, p in params.items() if not torch.equal(p, before[name])]
    assert set(changed) == set(params)


def test_an_untrained_dora_adapter_has_no_update_on_the_4bit_base_it_trains_on(manifest, tmp_path):
    from lora_study.measure.anatomy import run_anatomy
    from lora_study.study.sweep import RunSpec

    recipe = recipe_for("nf4", "fp32", detect_capability(CPU))
    model = add_lora(load_base_model(manifest, recipe, True, "eager", CPU), recipe, TARGETS, 4, 8.0, 0.0, False, "dora")
    model.save_pretrained(tmp_path / "dora")
    training = TrainingSettings.from_dict({**training_defaults(), "compute_dtype": "fp32", "lora_dropout": 0.0})
    run = RunSpec("r4-qv-nf4-dora", 4, 8.0, ("q", "v"), "nf4", True, training, method="dora")
    layout = layout_for("llama")[0]
    full_manifest = {**manifest, "model_type": "llama", "linear_layers": layout.declared_layers()}
    assert run_anatomy(full_manifest, tmp_path / "dora", run, tmp_path / "anatomy.csv", 1) == 4
    # DoRA's magnitudes start at the norms of the dequantized 4-bit rows: on that base, nothing moved yet.
    # (Merged into the fp32 weights instead, every row would be rescaled by ||W_nf4|| / ||W_fp32||.)
    assert (pd.read_csv(tmp_path / "anatomy.csv")["norm"] < 1e-5).all()
    # DoRA's anatomy loads the base model: where that does not fit, one row records it.
    assert run_anatomy(full_manifest, tmp_path / "dora", run, tmp_path / "capped.csv", 1, memory_limit_gb=1e-6) == 0
    capped = pd.read_csv(tmp_path / "capped.csv")
    assert len(capped) == 1 and capped["oom"].notna().all() and capped["layer"].isna().all()


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_4bit_evaluation_computes_exactly_what_training_computed(manifest, tmp_path, compute):
    """An NF4 adapter loaded for evaluation gives the logits of the trained model's forward bit for bit, on
    every CPU: bitsandbytes' fused CPU kernel (AVX512-BF16 CPUs, eval mode) would round differently."""
    recipe = recipe_for("nf4", compute, detect_capability(CPU))
    model = add_lora(load_base_model(manifest, recipe, True, "eager", CPU), recipe, TARGETS, 4, 8.0, 0.0, False, "lora")
    as_if_trained(model, seed=5)
    model.save_pretrained(tmp_path / "lora")
    inputs = batch(model.config.vocab_size)["input_ids"]
    with recipe.autocast_context("cpu"):
        trained = model.train()(input_ids=inputs).logits.detach().float()  # training's forward, with gradients
    loaded = load_for_evaluation(manifest, recipe, True, "eager", CPU, str(tmp_path / "lora"))
    with torch.inference_mode(), recipe.autocast_context("cpu"):
        evaluated = [loaded(input_ids=inputs).logits.float() for _ in range(2)]  # the second after any repacking
    assert all(torch.equal(logits, trained) for logits in evaluated)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_trained_model_put_in_evaluation_state_is_the_model_evaluation_loads(manifest, tmp_path, family):
    """What the training job scores (lora_study.measure.handoff) is what the evaluate job would load: the same dtype for
    every tensor and the same logits, bit for bit. GPT-2's learned position embeddings are one of the tensors
    prepare_model_for_kbit_training upcasts for training that a loaded model holds in the load dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_study.measure.evaluate import as_loaded_for_evaluation

    if family == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
        manifest = {"path": str(tmp_path / "gpt2"), "trust_remote_code": False}
    targets = TARGETS if family == "llama" else Targets(["c_attn"])
    recipe = recipe_for("nf4", "bf16", detect_capability(CPU))
    model = add_lora(load_base_model(manifest, recipe, True, "eager", CPU), recipe, targets, 4, 8.0, 0.0, True, "lora")
    as_if_trained(model, seed=7)
    model.save_pretrained(tmp_path / "adapter")
    as_loaded_for_evaluation(model, recipe)
    loaded = load_for_evaluation(manifest, recipe, True, "eager", CPU, str(tmp_path / "adapter"))
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in loaded.named_parameters()}
    inputs = batch(model.config.vocab_size)["input_ids"][:, :16]
    with torch.inference_mode(), recipe.autocast_context("cpu"):
        assert torch.equal(model(input_ids=inputs).logits, loaded(input_ids=inputs).logits)


def test_dora_on_a_4bit_base_gives_in_inference_what_it_gave_in_training(manifest, tmp_path):
    """bitsandbytes repacks 4-bit weights for its CPU kernel at the first forward without gradients (CPUs
    with AVX512-BF16); DoRA dequantizes them in every forward and must still read the right weights."""
    from bitsandbytes.functional import has_avx512bf16
    from peft import PeftModel
    from peft.utils.integrations import dequantize_module_weight

    recipe = recipe_for("nf4", "bf16", detect_capability(CPU))  # where `auto` picks bf16, bitsandbytes repacks
    model = add_lora(load_base_model(manifest, recipe, True, "eager", CPU), recipe, TARGETS, 4, 8.0, 0.0, False, "dora")
    as_if_trained(model, seed=3)
    adapter = str(tmp_path / "dora")
    model.save_pretrained(adapter)
    inputs = batch(model.config.vocab_size)["input_ids"]
    with torch.no_grad(), recipe.autocast_context("cpu"):
        trained = model.train()(input_ids=inputs).logits.float()  # as in training: no repacking

    def inference_logits(loaded) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits after a first forward (the one that would repack) and the weights DoRA then reads."""
        layer = loaded.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
        before = dequantize_module_weight(layer).float()
        with torch.inference_mode(), recipe.autocast_context("cpu"):
            loaded(input_ids=inputs)
            logits = loaded(input_ids=inputs).logits.float()
        return logits, (dequantize_module_weight(layer).float() - before).norm() / before.norm()

    logits, weight_change = inference_logits(load_for_evaluation(manifest, recipe, True, "eager", CPU, adapter))
    assert weight_change == 0
    assert ((logits - trained).norm() / trained.norm()).item() < 0.02
    if has_avx512bf16():  # this CPU repacks: without compute_4bit_as_in_training DoRA reads other weights
        plain = PeftModel.from_pretrained(load_base_model(manifest, recipe, True, "eager", CPU), adapter).eval()
        assert inference_logits(plain)[1] > 0.5


def test_effective_rank_of_constructed_updates(manifest):
    assert effective_rank(torch.tensor([3.0, 3.0, 3.0, 0.0])) == 3
    assert effective_rank(torch.tensor([10.0, 1.0, 0.1])) == 1  # 100 of 101.01 is over 90 %
    assert effective_rank(torch.zeros(4)) == 0
    model = adapted(manifest, "lora", rank=8, alpha=16.0)
    layers = model.base_model.model.model.layers
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.lora_A["default"].weight.zero_()
                module.lora_B["default"].weight.zero_()
        # q of layer 0: three directions of equal strength; v of layer 0: one dominant direction.
        q, v = layers[0].self_attn.q_proj, layers[0].self_attn.v_proj
        for i in range(3):
            q.lora_A["default"].weight[i, i] = 1.0
            q.lora_B["default"].weight[i, i] = 1.5  # scale 2: singular values 3, 3, 3
        v.lora_A["default"].weight[0, 0] = v.lora_A["default"].weight[1, 1] = 1.0
        v.lora_B["default"].weight[0, 0], v.lora_B["default"].weight[1, 1] = 5.0, 0.5
    updates = {u.layer: u for u in adapter_updates(model, layout_for("llama")[0])}
    q_update, v_update = updates["model.layers.0.self_attn.q_proj"], updates["model.layers.0.self_attn.v_proj"]
    assert (q_update.effective_rank, q_update.group) == (3, "q")
    assert q_update.norm == pytest.approx(math.sqrt(3 * 9))
    assert [float(x) for x in q_update.singular_values.split()[:4]] == pytest.approx([3, 3, 3, 0], abs=1e-6)
    assert (v_update.effective_rank, v_update.group) == (1, "v")
    assert updates["model.layers.1.self_attn.q_proj"].effective_rank == 0  # no update at all


def test_planner_counts_dora_magnitudes_and_full_finetuning_states(tiny_llama):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama)
    lora, dora = lora_params(config, TARGETS, 4), lora_params(config, TARGETS, 4, "dora")
    # One magnitude per output feature of each adapted layer: q (64) and v (32) in 2 layers.
    assert dora - lora == 2 * (64 + 32)
    saved = {m: saved_activation_bytes(config, TARGETS, 4, 0.0, "float32", False, "sdpa", 2, 32, m)[0]
             for m in ("lora", "dora", "full")}  # fmt: skip
    assert saved["dora"] > saved["lora"]  # DoRA's forward keeps the combined weight and its norm

    from lora_study.study.sweep import RunSpec
    from lora_study.training.planner import BatchShape

    training = TrainingSettings.from_dict({**training_defaults(), "max_steps": 2, "batch_size": 2, "lora_dropout": 0.0})
    facts = model_facts(config)
    shape = BatchShape(2, 32, 40)
    full_run = RunSpec("full-fp32", 0, 0.0, (), "fp32", False, training, method="full")
    lora_run = RunSpec("r4-qv-fp32", 4, 8.0, ("q", "v"), "fp32", False, training)
    full = plan_run(full_run, fp32_recipe(full=True), config, facts, Targets(""), shape, "cpu", None)
    adapter = plan_run(lora_run, fp32_recipe(), config, facts, TARGETS, shape, "cpu", None)
    assert full.trainable_params == facts.total_params == sum(p.numel() for p in _model(config).parameters())
    # fp32 gradients and AdamW's two moments for every parameter (fp32 compute: no autocast copies).
    assert full.lora_states_gb * 1024**3 == pytest.approx(facts.total_params * 12)
    assert full.predicted_cpu_gb > adapter.predicted_cpu_gb


def _model(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


# --- a whole methods study through the workflow -------------------------------------------------------


DATA_SIZES = (8, 16)


def data_run(rank: int, size: int) -> str:
    return f"r{rank}-qv-fp32-stepsnone-ep1-ex{size}"  # the data size is in the id, like any training axis


def methods_config(model_dir) -> dict:
    return {
        "model": {"source": str(model_dir)},
        "dataset": {"source": "generated", "generated_examples": 200, "validation_size": 16, "max_length": 128},
        "training": {"max_steps": 3, "batch_size": 4, "warmup_steps": 0, "log_every": 1},
        "methods": {"full": {"learning_rate": 1.0e-3}},
        "rank_patterns": {"qwide": {"ranks": {"q_proj": 8}, "alphas": {"q_proj": 16}}},
        "evaluation": {"batch_size": 8, "exact_match_examples": 4, "max_new_tokens": 4},
        "sweep": {
            "grids": [
                {
                    "rank": [4, 8],
                    "modules": [["q", "v"]],
                    "quantization": ["fp32"],
                    "training": {"learning_rate": [1.0e-3, 3.0e-3]},
                },
                {
                    "rank": [4],
                    "modules": [["q", "v"]],
                    "quantization": ["fp32"],
                    "method": ["pissa", "eva", "corda", "lora_ga"],
                },
                {"rank": [4], "modules": [["q", "v"]], "quantization": ["nf4"], "method": ["loftq"]},
                # Per-layer rank: q at twice the run's rank (and alpha), one more row of the methods table.
                {"rank": [4], "modules": [["q", "v"]], "quantization": ["fp32"], "rank_pattern": ["qwide"]},
                {"method": ["full"], "quantization": ["fp32"]},
                # Data as an axis: rank x training-set size, one epoch each (lora_study.questions.rank_for_data).
                {
                    "rank": [4, 8],
                    "modules": [["q", "v"]],
                    "quantization": ["fp32"],
                    "training": {"train_examples": list(DATA_SIZES), "max_steps": [None], "epochs": [1]},
                },
            ],
        },
    }


@pytest.fixture(scope="module")
def methods_study(tiny_llama, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("methods-study")
    (workdir / "config.yaml").write_text(yaml.safe_dump(methods_config(tiny_llama)))
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return workdir


def derived(workdir, name: str) -> pd.DataFrame:
    return pd.read_csv(workdir / "results/tables/derived" / f"{name}.csv")


def test_methods_study_runs_and_records_each_method(methods_study):
    runs = pd.read_csv(methods_study / "results/tables/runs.csv").set_index("run_id")
    assert set(runs.index) == {"base-fp32", "r4-qv-fp32", "r4-qv-fp32-lr3e-3", "r8-qv-fp32", "r8-qv-fp32-lr3e-3",
                               "r4-qv-fp32-pissa", "r4-qv-fp32-eva", "r4-qv-fp32-corda", "r4-qv-fp32-lora_ga",
                               "r4-qv-nf4-loftq", "r4-qv-fp32-rpqwide", "base-nf4", "full-fp32",
                               *(data_run(rank, size) for rank in (4, 8) for size in DATA_SIZES)}  # fmt: skip
    assert runs.loc["r4-qv-fp32-lr3e-3", "training.learning_rate"] == 3e-3
    assert runs.loc["full-fp32", "trainable_params"] == runs.loc["full-fp32", "total_params"]
    assert runs.loc["full-fp32", "training.learning_rate"] == 1e-3  # methods.full
    assert runs.loc["r4-qv-fp32-pissa", "adapter_params"] == 2 * runs.loc["r4-qv-fp32-pissa", "trainable_params"]
    assert runs["perplexity"].notna().all()
    # EVA: initialised from the run's own training batches, its per-layer ranks saved with the adapter.
    assert "EVA initialised on 8 batches" in (methods_study / "logs/train/r4-qv-fp32-eva.log").read_text()
    config = json.loads((methods_study / "results/runs/r4-qv-fp32-eva/adapter/adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["r"] == 4
    # CorDA and LoRA-GA: initialised from the same batches before PEFT built the adapter, saved converted.
    for method, logged in (("corda", "CorDA (ipm) covariances from 8 batches"), ("lora_ga", "LoRA-GA gradients")):
        assert logged in (methods_study / f"logs/train/r4-qv-fp32-{method}.log").read_text()
        assert runs.loc[f"r4-qv-fp32-{method}", "adapter_params"] == 2 * runs.loc[f"r4-qv-fp32-{method}",
                                                                                   "trainable_params"]  # fmt: skip
    # LoftQ: the 4-bit base kept, the adapter starting at the quantization error's top part; a plain adapter.
    assert "LoftQ initialised 4 layers" in (methods_study / "logs/train/r4-qv-nf4-loftq.log").read_text()
    config = json.loads((methods_study / "results/runs/r4-qv-nf4-loftq/adapter/adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 4
    # A rank pattern: saved with the adapter; the planner predicted the trainable parameters PEFT created.
    config = json.loads((methods_study / "results/runs/r4-qv-fp32-rpqwide/adapter/adapter_config.json").read_text())
    assert (config["rank_pattern"], config["alpha_pattern"]) == ({"q_proj": 8}, {"q_proj": 16})
    patterned = runs.loc["r4-qv-fp32-rpqwide"]
    assert patterned["rank_pattern"] == "qwide"
    assert patterned["trainable_params"] > runs.loc["r4-qv-fp32", "trainable_params"]
    plan = pd.read_csv(methods_study / "results/tables/plan.csv").set_index("run_id")
    assert plan.loc["r4-qv-fp32-rpqwide", "trainable_params"] == patterned["trainable_params"]


def test_full_finetuning_saves_every_trained_weight(methods_study, tiny_llama):
    trained = load_file(methods_study / "results/runs/full-fp32/adapter/model.safetensors")
    base = load_file(tiny_llama / "model.safetensors")
    linear = [name for name, tensor in base.items() if tensor.dim() == 2 and "proj" in name]
    assert linear and all(trained[name].dtype == torch.float32 for name in linear)
    assert all(not torch.equal(trained[name], base[name]) for name in linear)


def test_methods_study_tables(methods_study):
    runs = pd.read_csv(methods_study / "results/tables/runs.csv").set_index("run_id")
    matrix = derived(methods_study, "matrix__rank__learning_rate")
    assert list(matrix["rank"]) == [4, 8]
    assert list(matrix.columns[1:]) == ["learning_rate=0.001", "learning_rate=0.003"]
    assert matrix.iloc[1, 2] == pytest.approx(runs.loc["r8-qv-fp32-lr3e-3", "perplexity"])

    methods = derived(methods_study, "methods").set_index("method")
    # LoftQ's nf4 block has no plain LoRA run; the rank pattern is a variant of LoRA.
    assert list(methods.index) == ["lora", "pissa", "eva", "corda", "lora_ga", "lora+rpqwide"]
    assert methods.loc["lora+rpqwide", "compared_with"] == "r4-qv-fp32"
    assert pd.isna(methods.loc["lora", "verdict"])  # the reference itself
    # PiSSA against LoRA at the same rank: the verdict the per-row scores give (m = the block's 5 variants, the
    # report's default tolerances), recomputed from the study's examples tables, on learning and on general text.
    from lora_study.stats.verdicts import GENERAL, Judge, evidence_from_examples

    tables = methods_study / "results/tables"
    judge = Judge(evidence_from_examples(pd.read_csv(tables / "examples.csv")),
                  general=evidence_from_examples(pd.read_csv(tables / "general_examples.csv")))  # fmt: skip
    assert methods.loc["pissa", "compared_with"] == "r4-qv-fp32"
    expected = judge.compare("r4-qv-fp32-pissa", "r4-qv-fp32", "perplexity", 0.01, 5)
    assert methods.loc["pissa", "verdict"] == expected.verdict.value
    forgetting = judge.compare("r4-qv-fp32-pissa", "r4-qv-fp32", GENERAL, 0.02, 5)
    assert methods.loc["pissa", "general_verdict"] == forgetting.verdict.value
    assert "; on general text " in (methods_study / "results/report/findings.md").read_text()

    shares = derived(methods_study, "full_finetuning").set_index("run_id")
    base, full = runs.loc["base-fp32", "perplexity"], runs.loc["full-fp32", "perplexity"]
    for run_id, row in shares.iterrows():
        expected = 100 * (base - runs.loc[run_id, "perplexity"]) / (base - full)
        assert row["share_of_full_pct"] == pytest.approx(expected)
        assert row["memory_vs_full_pct"] == pytest.approx(
            100 * runs.loc[run_id, "peak_memory_gb"] / runs.loc["full-fp32", "peak_memory_gb"]
        )
    assert "full-fp32" not in shares.index and len(shares) == 14  # every adapter run

    anatomy = derived(methods_study, "anatomy")
    assert set(anatomy["run_id"]) == set(runs.index) - {"base-fp32", "base-nf4"}
    lora = anatomy[anatomy["run_id"] == "r4-qv-fp32"].set_index("group")
    assert set(lora.index) == {"q", "v"} and (lora["effective_rank"] <= 4).all()
    assert (lora["utilisation"] == lora["effective_rank"] / 4).all()
    assert anatomy.loc[anatomy["run_id"] == "full-fp32", "group"].nunique() == 5  # q, k, v, o, mlp

    report = (methods_study / "results/report/findings.md").read_text()
    for sentence in ("Best learning rate per rank:", "Methods at rank 4", "Full fine-tuning (full-fp32",
                     "Rank usage (effective rank"):  # fmt: skip
        assert sentence in report
    # The 90 %-of-full-fine-tuning claim: the answer and evidence its one-sided test gives on the study's rows.
    from lora_study.analysis.runs import prepare
    from lora_study.questions.full_finetuning import full_share_table
    from lora_study.questions.reference_claims import full_claim

    claims = derived(methods_study, "reference_claims").set_index("claim")
    configs = pd.read_csv(methods_study / "results/tables/configs.csv")
    expected_claim = full_claim(full_share_table(prepare(configs)), judge)
    assert expected_claim.answer != "not tested"
    claim = claims.loc["LoRA reaches about 90% of full fine-tuning."]
    assert (claim["answer"], claim["evidence"]) == (expected_claim.answer, expected_claim.evidence)
    assert (methods_study / "results/charts/heatmap__rank__learning_rate.svg").is_file()
    assert (methods_study / "results/charts/effective_rank.svg").is_file()


def test_variants_peft_cannot_put_on_expert_weights_are_refused_by_the_check():
    from lora_study.study.modules import ARCHITECTURES
    from lora_study.study.preflight import ModuleResolutionError, check_run
    from lora_study.study.sweep import RunSpec

    layout = ARCHITECTURES["mixtral"]
    training = TrainingSettings.from_dict({**training_defaults(), "lora_dropout": 0.0})
    names = [*layout.declared_layers(), "lm_head"]
    run = RunSpec("r8-mlp-16bit-dora", 8, 16.0, ("mlp",), "16bit", False, training, method="dora")
    with pytest.raises(ModuleResolutionError, match="dora cannot adapt mixture-of-experts weights"):
        check_run(run, layout, names, "mixtral", import_it=False)
    attention_only = RunSpec("r8-qkvo-16bit-dora", 8, 16.0, ("q", "k", "v", "o"), "16bit", False, training,
                             method="dora")  # fmt: skip
    assert check_run(attention_only, layout, names, "mixtral", import_it=False).parameters == ()
    full = RunSpec("full-16bit", 0, 0.0, (), "16bit", False, training, method="full")
    assert check_run(full, layout, names, "mixtral", import_it=False).modules == ""


@pytest.mark.parametrize(("method", "rank"), [("lora", 4), ("rslora", 16), ("lora", 16)])
def test_a_plain_adapters_spectrum_from_its_factors_equals_the_merged_update(manifest, tmp_path, method, rank):
    """LoRA and rsLoRA: the anatomy read straight from the adapter file (the r x r core of B A, no base model)
    gives the layers, shapes, norms, effective ranks and leading singular values of the full update computed on
    the loaded model. DoRA is not plain: it goes to the model."""
    from lora_study.measure.anatomy import factor_updates

    model = adapted(manifest, method, rank=rank)
    train_steps(model, batch(model.config.vocab_size))  # B moves off zero: a real, rank-r update
    model.save_pretrained(tmp_path / "adapter")
    layout = layout_for("llama")[0]
    expected, read = adapter_updates(model, layout), factor_updates(tmp_path / "adapter", layout)
    assert [(u.layer, u.group, u.rows, u.cols, u.effective_rank) for u in read] == [
        (u.layer, u.group, u.rows, u.cols, u.effective_rank) for u in expected]  # fmt: skip
    assert all(math.isclose(r.norm, e.norm, rel_tol=1e-5) for r, e in zip(read, expected, strict=True))
    for r, e in zip(read, expected, strict=True):
        values, reference = map(lambda u: [float(v) for v in u.singular_values.split()], (r, e))
        assert len(values) == len(reference)
        assert all(
            math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6 * reference[0])
            for a, b in zip(values, reference, strict=True)
        )
    adapted(manifest, "dora").save_pretrained(tmp_path / "dora")
    assert factor_updates(tmp_path / "dora", layout) is None


@pytest.mark.parametrize("quantization", ["fp32", "nf4", "bf16"])
def test_eva_starts_each_layer_at_its_inputs_principal_directions_with_ranks_from_their_variance(
    manifest, tiny_llama, quantization
):
    """EVA (PEFT): after initialize_eva on real training rows, every adapted layer's A holds orthonormal rows
    (the top singular vectors of that layer's inputs), B is zero (the model starts as the base model), and the
    ranks redistributed across layers stay within rho x r each and the study's budget in total."""
    from datasets import Dataset

    from lora_study.study.config import validate_config
    from lora_study.study.methods import EVA_RHO
    from lora_study.study.settings import TrainingSettings
    from lora_study.training.initialisation import calibration_batches, initialize_eva
    from lora_study.training.precision import recipe_for

    recipe = recipe_for(quantization, "fp32" if quantization == "nf4" else None, detect_capability(CPU))
    model = load_base_model(manifest, recipe, quantization == "nf4", "sdpa", CPU)
    model = add_lora(model, recipe, TARGETS, 4, 8.0, 0.0, False, "eva")
    rng = torch.Generator().manual_seed(0)
    rows = Dataset.from_list([{"input_ids": torch.randint(5, 390, (30,), generator=rng).tolist(), "prompt_length": 10}
                              for _ in range(64)])  # fmt: skip
    config = validate_config({"model": {"source": "x"}, "dataset": {"source": "generated"}, "sweep": {}})
    training = TrainingSettings.from_dict({**config["training"], "batch_size": 4})
    pattern = initialize_eva(model, calibration_batches(rows, 0, training, CPU), recipe)
    ranks = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().double()
            ranks.append(a.shape[0])
            assert torch.allclose(a @ a.T, torch.eye(a.shape[0], dtype=torch.double), atol=1e-4), name
            assert not module.lora_B["default"].weight.any(), name
    assert len(ranks) == 4 and all(1 <= r <= EVA_RHO * 4 for r in ranks) and sum(ranks) <= 4 * len(ranks)
    assert pattern == {} or set(pattern.values()) <= set(ranks)


def test_train_examples_crossed_with_rank_trains_on_subsets_and_answers_how_much_rank_the_data_needs(methods_study):
    for rank in (4, 8):
        for size in DATA_SIZES:
            trained = json.loads(
                (methods_study / f"results/runs/{data_run(rank, size)}/train_metrics.json").read_text()
            )
            assert trained["steps"] == size // 4  # one epoch over the run's first `size` rows, batch 4
    table = derived(methods_study, "rank_for_data")
    assert list(table["train_examples"]) == list(DATA_SIZES) and set(table["rank_needed"]) <= {4, 8}
    assert list(derived(methods_study, "matrix__rank__train_examples")["rank"]) == [4, 8]
    findings = (methods_study / "results/report/findings.md").read_text()
    assert "- Rank needed per training-set size (the smallest rank equivalent to the best at that size" in findings


def test_more_training_examples_than_prepared_stop_the_run_with_the_fix():
    from datasets import Dataset

    from lora_study.core.errors import UserError
    from lora_study.prepare.data import first_rows

    split = Dataset.from_list([{"input_ids": [1, 2, 3], "prompt_length": 1}] * 10)
    assert len(first_rows(split, 4, "run")) == 4 and first_rows(split, None, "run") is split
    with pytest.raises(UserError, match=r"training\.train_examples 11, but the prepared training split has 10 rows"):
        first_rows(split, 11, "run")
