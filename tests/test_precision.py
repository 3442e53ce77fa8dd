"""The precision recipe on real components: capability -> dtype, autocast, gradient scaling, throughput."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_study.study.config import validate_config
from lora_study.study.modules import Targets
from lora_study.study.settings import TrainingSettings
from lora_study.training.checkpoints import Progress
from lora_study.training.loading import add_lora, load_base_model
from lora_study.training.loop import scheduler_name
from lora_study.training.loss import ResponseLoss
from lora_study.training.precision import DeviceCapability, GradScaling, recipe_for, resolve_dtype

AVX2 = DeviceCapability("cpu", "EPYC (AVX2 only)", "AVX2", ())
AVX512_NO_BF16 = DeviceCapability("cpu", "Skylake-SP", "AVX512", ())
AVX512_BF16 = DeviceCapability("cpu", "Sapphire Rapids", "AVX512", ("avx512_bf16", "amx_bf16"))
# A bf16-capable CPU told to dispatch like an AVX2 one (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA).
BF16_DISPATCHED_AS_AVX2 = DeviceCapability("cpu", "Sapphire Rapids", "AVX2", ("avx512_bf16",))
BF16_ONEDNN_CAPPED = DeviceCapability("cpu", "Sapphire Rapids", "AVX512", ("avx512_bf16",), onednn_max_isa="AVX2")
H100 = DeviceCapability("cuda", "H100", cuda_compute_capability="9.0", cuda_native_bf16=True)
T4 = DeviceCapability("cuda", "T4", cuda_compute_capability="7.5", cuda_native_bf16=False)


@pytest.mark.parametrize(
    "capability, expected",
    [
        (AVX2, "fp32"),
        (AVX512_NO_BF16, "fp32"),  # get_cpu_capability() says AVX512 on CPUs without bf16 too
        (AVX512_BF16, "bf16"),
        (BF16_DISPATCHED_AS_AVX2, "fp32"),
        (BF16_ONEDNN_CAPPED, "fp32"),
        (H100, "bf16"),
        (T4, "fp16"),
    ],
)
def test_auto_resolves_to_the_devices_fast_dtype(capability, expected):
    assert resolve_dtype("auto", capability) == expected
    nf4 = recipe_for("nf4", "auto", capability)
    assert (nf4.weight_format, nf4.compute_dtype) == ("nf4", expected)
    sixteen = recipe_for("16bit", None, capability)
    assert sixteen.weight_format == sixteen.compute_dtype == expected  # an AVX2 CPU's "16-bit" reference is fp32


def test_explicit_dtypes_win_and_unquantized_runs_compute_in_their_own_dtype():
    assert recipe_for("nf4", "bf16", AVX2).compute_dtype == "bf16"
    assert recipe_for("int8", "fp16", H100).compute_dtype == "fp16"
    assert recipe_for("fp32", None, H100).compute_dtype == "fp32"
    assert recipe_for("bf16", None, AVX2).compute_dtype == "bf16"
    assert recipe_for("fp16", None, T4).grad_scaler
    assert not recipe_for("16bit", None, H100).grad_scaler


def test_this_machine_is_detected_as_torch_dispatches(monkeypatch):
    from lora_study.training.precision import detect_capability

    capability = detect_capability(torch.device("cpu"))
    assert capability.cpu_capability == torch.backends.cpu.get_cpu_capability()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert detect_capability(torch.device("cpu")).fast_dtype == "fp32"


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of every matmul and attention kernel as dispatched (after autocast)."""

    KERNELS = ("mm", "bmm", "addmm", "gemm_4bit", "scaled_dot_product")

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(kernel in name for kernel in self.KERNELS):
            # The first argument is the activation (bitsandbytes' absmax tensors are fp32 by design).
            self.seen.setdefault(name, set()).add(str(args[0].dtype))
        return func(*args, **(kwargs or {}))


def _lora_model(tiny_llama, recipe):
    manifest = {"path": str(tiny_llama), "trust_remote_code": False}
    model = load_base_model(manifest, recipe, True, "sdpa", torch.device("cpu"))
    return add_lora(model, recipe, Targets(["q_proj", "k_proj", "v_proj", "o_proj"]), 4, 8, 0.0, False)


def _batch():
    from lora_study.training.batching import collate

    return collate([{"input_ids": list(range(5, 25)), "prompt_length": 8}] * 2, pad_id=0)


def test_a_quantized_run_computes_its_projections_and_attention_in_the_compute_dtype(tiny_llama):
    recipe = recipe_for("nf4", "bf16", AVX2)
    model = _lora_model(tiny_llama, recipe)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.float32 for n, d in dtypes.items() if "norm" in n)
    assert model.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16
    recorder = MatmulDtypes()
    with recorder, recipe.autocast_context("cpu"):
        loss_sum, _ = ResponseLoss(model)(_batch())
    assert recorder.seen, "no matmul was recorded"
    # 4-bit base matmuls, LoRA and head matmuls and attention all take bf16 inputs.
    assert all(seen == {"torch.bfloat16"} for seen in recorder.seen.values()), recorder.seen
    assert loss_sum.dtype == torch.float32  # the loss itself is reduced in fp32


def test_the_loss_check_leaves_4bit_weights_trainable(tiny_llama):
    """The check runs in training mode: in eval mode bitsandbytes repacks 4-bit weights on bf16 CPUs
    into an inference-only layout, and training would go on without gradients through the base layers."""
    recipe = recipe_for("nf4", "bf16", AVX2)
    model = _lora_model(tiny_llama, recipe)
    model.train()
    with recipe.autocast_context("cpu"):
        loss_sum, count = ResponseLoss(model)(_batch())
    states = [m.weight.quant_state for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert states and not any(getattr(s, "packing_format_for_cpu", False) for s in states)
    (loss_sum / count).backward()
    first_layer_lora = [p for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n]
    assert first_layer_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_layer_lora)


def test_on_a_cpu_without_native_bf16_auto_computes_everything_in_fp32(tiny_llama):
    recipe = recipe_for("nf4", "auto", AVX2)
    model = _lora_model(tiny_llama, recipe)
    recorder = MatmulDtypes()
    with recorder, recipe.autocast_context("cpu"):
        ResponseLoss(model)(_batch())
    assert not recipe.autocast
    assert set().union(*recorder.seen.values()) == {"torch.float32"}


def test_fp16_compute_trains_with_an_active_gradient_scaler(tiny_llama):
    recipe = recipe_for("nf4", "fp16", AVX2)
    model = _lora_model(tiny_llama, recipe)
    scaling = GradScaling(recipe, "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    before = [p.detach().clone() for p in params]
    loss = ResponseLoss(model)
    with recipe.autocast_context("cpu"):
        loss_sum, count = loss(_batch())
    scaling.backward(loss_sum / count)
    # Gradients arrive scaled: the scaler multiplied the loss before backward.
    scaled_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    scaling.unscale(optimizer)
    unscaled_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert scaling.enabled and scaling.scale == 65536.0
    assert float(scaled_norm) == pytest.approx(float(unscaled_norm) * scaling.scale, rel=1e-3)
    scaling.step(optimizer)
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert not GradScaling(recipe_for("nf4", "bf16", AVX2), "cpu").enabled


def _training(**changes) -> TrainingSettings:
    config = validate_config({"model": {"source": "x"}, "dataset": {"source": "generated"}, "sweep": {}})
    return TrainingSettings.from_dict({**config["training"], **changes})


def test_constant_schedule_with_warmup_steps_warms_up():
    assert scheduler_name(_training(lr_scheduler="constant", warmup_steps=3)) == "constant_with_warmup"
    assert scheduler_name(_training(lr_scheduler="constant", warmup_steps=0)) == "constant"
    assert scheduler_name(_training(lr_scheduler="cosine", warmup_steps=3)) == "cosine"


def test_steady_throughput_leaves_out_the_first_steps_of_every_process_and_checkpoint_time():
    progress = Progress()
    # First process: 3 steps, the first 2 are warm-up (slow); then a checkpoint is saved.
    for number, seconds in enumerate([5.0, 3.0, 1.0], start=1):
        progress.record_step(number, 2, seconds, tokens=100, loss_tokens=10)
    progress.checkpoint_seconds += 7.0  # what Checkpointer.save adds; never a step's time
    # A resumed process: its own first 2 steps are warm-up again.
    for number, seconds in enumerate([4.0, 2.0, 1.0, 1.0], start=1):
        progress.record_step(number, 2, seconds, tokens=100, loss_tokens=10)
    tokens_per_s, loss_tokens_per_s, steps = progress.throughput()
    assert steps == 3
    assert tokens_per_s == pytest.approx(300 / 3.0)
    assert loss_tokens_per_s == pytest.approx(30 / 3.0)
    assert progress.train_seconds == pytest.approx(17.0)  # every step, no checkpoint time
    # Too short to reach a steady state: every step counts, and says so.
    short = Progress()
    short.record_step(1, 2, 2.0, 50, 5)
    short.step = 1
    assert short.throughput() == (25.0, 2.5, 1)
    assert math.isnan(Progress().throughput()[0])


def test_a_real_checkpoint_save_is_timed_apart_from_the_steps(tmp_path):
    from lora_study.training.checkpoints import Checkpointer

    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    progress = Progress(step=1)
    Checkpointer(tmp_path / "ckpt", "fp", 1).save(model, optimizer, scheduler, progress)
    assert progress.checkpoint_seconds > 0 and progress.train_seconds == 0
    restored = Checkpointer(tmp_path / "ckpt", "fp", 1).restore(model, optimizer, scheduler)
    assert restored is not None and restored.checkpoint_seconds == progress.checkpoint_seconds
