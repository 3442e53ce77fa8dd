"""Shared fixtures: a real (tiny, randomly initialised) Llama with a real tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# `make test` runs two tests at once (pytest-xdist) on a 2-core machine. Two-thread torch processes side by
# side then stall at every small op, waiting for a thread the other process has preempted, so under xdist
# every job and this process compute on one thread (set before anything imports torch).
PARALLEL_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if PARALLEL_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
# The threads a training or evaluation job of the tests' workflow runs get: the rules' 2 under `--cores 2`,
# capped by --max-threads under xdist.
JOB_THREADS = 1 if PARALLEL_WORKER else 2

from lora_study.prepare.datagen import generate_examples  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_llama(out_dir: Path, layers: int = 2) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on the generated data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [" ".join(e[k] for k in ("instruction", "input", "output")) for e in generate_examples(600, 1)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def answering_model(tiny_llama, tmp_path_factory):
    """The tiny Llama after 80 steps of plain next-token training, and 40 held-out chat rows: it answers with
    varied, non-empty text (the untrained model answers every prompt with a newline, which would make agreement
    trivial)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_study.prepare.data import tokenize_record
    from lora_study.training.batching import collate

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [tokenize_record(r, "chat", tokenizer) for r in generate_examples(440, 3)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = rows[40:]
    for step in range(80):
        start = (step * 16) % (len(train) - 16)
        batch = collate(train[start : start + 16], tokenizer.pad_token_id)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("answering")
    model.save_pretrained(out)
    for name in tiny_llama.iterdir():
        if name.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(name, out / name.name)
    return out, rows[:40]


# Small configs of other families, with the tiny Llama's tokenizer (vocab 400).
FAMILY_CONFIGS = {
    # Gemma 2: no SDPA in transformers (eager attention), its own head_dim and soft-capping.
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=512),
    # Phi-3: q, k, v fused in qkv_proj.
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512),
    # Mixtral: experts as 3-D parameters (transformers 5), which bitsandbytes leaves unquantized.
    "mixtral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512),
    # Jamba: Mamba layers with attention every other layer; its Mamba forward reads dt_proj.weight directly.
    "jamba": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_expand=2,
                  mamba_dt_rank=8, max_position_embeddings=512),
    # Mamba: no attention at all (mixer.in_proj, x_proj, dt_proj, out_proj), names no convention places.
    "mamba": dict(hidden_size=64, state_size=16, num_hidden_layers=1, expand=2, conv_kernel=4),
    # Qwen3.5: a hybrid, three gated linear-attention layers then one full-attention layer. Sizes in multiples of
    # 32 (outputs) and 64 (inputs): bitsandbytes' 4-bit CPU inference kernel (AVX512-BF16) needs them.
    "qwen3_5_text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=32,
                         linear_key_head_dim=8, linear_value_head_dim=8, max_position_embeddings=512,
                         layer_types=["linear_attention"] * 3 + ["full_attention"]),
    # DeepSeek-V3: multi-head latent attention, a dense first layer, then routed and shared experts.
    "deepseek_v3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                        q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
                        first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=512),
}  # fmt: skip


def build_tiny_family(out_dir: Path, model_type: str, tokenizer_dir: Path, **changes) -> Path:
    """A randomly initialised model of `model_type`, saved with the tiny Llama's tokenizer."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id)  # fmt: skip
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **ids, **FAMILY_CONFIGS[model_type])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir, safe_serialization=True)
    for name in tokenizer_dir.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(name, out_dir / name.name)
    if changes:
        config_file = out_dir / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
    return out_dir


@pytest.fixture(scope="session")
def tiny_gemma2(tiny_llama, tmp_path_factory) -> Path:
    return build_tiny_family(tmp_path_factory.mktemp("tiny-gemma2"), "gemma2", tiny_llama)


def tiny_study_config(model_dir: Path) -> dict:
    """A whole study in seconds on a small data slice: every sweep axis, 4 configurations (one replicated)
    + baseline."""
    return {
        "model": {"source": str(model_dir)},
        "dataset": {
            "source": "generated",
            "generated_examples": 240,
            "validation_size": 24,
            "template": "chat",
            "max_length": 128,
        },
        # No dropout, as the default study.
        "training": {"max_steps": 3, "batch_size": 4, "warmup_steps": 0, "log_every": 1, "lora_dropout": 0.0},
        "evaluation": {"batch_size": 8, "exact_match_examples": 8, "max_new_tokens": 8},
        "sweep": {
            "baseline": True,
            "noise_replicates": 2,  # r4-qv-nf4, the centre of the first grid, also with seed 1
            "grids": [
                {"rank": [4, 8], "modules": [["q", "v"]], "quantization": ["nf4"]},
                {"rank": [4], "modules": [["q", "v"], ["q", "k", "v", "o", "mlp"]], "quantization": ["nf4"]},
                {"rank": [4], "modules": [["q", "v"]], "quantization": ["fp32"]},
            ],
        },
    }


# A hub-token-shaped secret in every test run's environment: it must never reach results/ or logs/.
FAKE_HUB_TOKEN = "hf_testTOKENdoNotLeak0123456789abcdef"


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"),
        *(("--max-threads", str(JOB_THREADS)) if PARALLEL_WORKER else ()),
        *args,
    ]  # fmt: skip


def snakemake_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_TOKEN": FAKE_HUB_TOKEN}


# Hang guards, not performance checks. The slowest run of the suite (a whole study, SLURM included) takes
# about 2.5 min where the AVX2 dispatch is emulated on an AVX-512 machine and about 6 min on a real AVX2
# machine, up to twice that while another test runs beside it (make test runs two): a process still running
# after these limits is stuck, whatever the machine.
HANG_GUARD_S = 1800
# A single command that is no workflow (a linter, a headless browser, a helper process).
COMMAND_HANG_GUARD_S = 600


def run_guarded(command: list[str], guard_s: float = COMMAND_HANG_GUARD_S, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with output captured; a process that outlives `guard_s` fails the test as hung."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=guard_s, **kwargs)
    except subprocess.TimeoutExpired as error:
        output = "".join(part.decode() if isinstance(part, bytes) else part for part in (error.stdout, error.stderr)
                         if part)  # fmt: skip
        pytest.fail(
            f"hang guard: {' '.join(map(str, command[:6]))} ... still running after {guard_s:.0f} s. This limit is "
            f"several times what the slowest machine class needs; it catches a hung process, not a slow machine.\n"
            f"{output[-3000:]}",
            pytrace=False,
        )


def require(present: bool, what: str) -> None:
    """Skip a test whose tool is missing, except under CI, which installs it (.ci/run): there it fails."""
    if not present:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(what)


def prepared_inputs(model_dir: Path, config: dict, out: Path) -> tuple[dict, dict, Path]:
    """The validated config, model manifest and data splits, made as the prepare_model and prepare_data jobs
    make them, for tests that call the jobs' functions in-process."""
    from transformers import AutoTokenizer

    from lora_study.prepare.data import prepare_data
    from lora_study.prepare.model_source import describe_model
    from lora_study.study.config import validate_config

    config = validate_config(config)
    prepare_data(config["dataset"], AutoTokenizer.from_pretrained(model_dir), out / "splits")
    return config, describe_model(model_dir, str(model_dir), trust_remote_code=False), out / "splits"


def train_and_evaluate(run, config: dict, manifest: dict, splits: Path, out: Path, threads: int):
    """One run trained and evaluated in-process by the train and evaluate jobs' own functions; outputs in `out`
    (adapter/, examples.csv, ...)."""
    from lora_study.core.paths import EvalOutputs
    from lora_study.measure.evaluate import evaluate_run
    from lora_study.training.loop import TrainOutputs, train_run

    train_run(run, manifest, splits, TrainOutputs(out / "adapter", out / "t.json", out / "curve.csv"),
              threads=threads, checkpoint_dir=out / "checkpoint")  # fmt: skip
    outputs = EvalOutputs(out / "e.json", out / "p.jsonl", out / "examples.csv")
    return evaluate_run(run, config["evaluation"], config["training"], manifest, splits, out / "adapter", outputs,
                        threads=threads)  # fmt: skip


def run_snakemake(
    workdir: Path, *args: str, guard_s: float = HANG_GUARD_S, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """The real workflow, in `workdir`, with this repository's Snakefile."""
    command = snakemake_command(workdir, *args)
    env = {**snakemake_env(), **(extra_env or {})}
    return run_guarded(command, guard_s, env=env, cwd=workdir)


@pytest.fixture(scope="session")
def tiny_study(tiny_llama, tmp_path_factory) -> Path:
    """The whole workflow run once on the tiny Llama; tests read its results."""
    import yaml

    workdir = tmp_path_factory.mktemp("study")
    (workdir / "config.yaml").write_text(yaml.safe_dump(tiny_study_config(tiny_llama)))
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return workdir


# How `make test` spreads the suite over two pytest-xdist workers (--dist loadscope, with the scheduler below):
# each group runs whole on one worker, so a study fixture is built once, and the costliest groups start first,
# so neither worker is left with a long group at the end. A group is a test file, except that the files reading
# the shared tiny study form one group.
TINY_STUDY_FILES = ("test_charts.py", "test_report_html.py", "test_tracking.py", "test_workflow.py")
# The SLURM study goes first: it mostly waits for the cluster, so the other worker's computing hides it.
COSTLIEST_GROUPS = (
    "test_slurm.py", "test_reruns.py", "tiny_study", "test_methods.py", "test_faults.py", "test_bad_inputs.py",
    "test_downstream.py", "test_sharded.py", "test_modules.py", "test_gpu_check.py",
)  # fmt: skip


def group_of(nodeid: str) -> str:
    file = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return "tiny_study" if file in TINY_STUDY_FILES else file


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    strays = [
        item.nodeid for item in items if "tiny_study" in item.fixturenames and group_of(item.nodeid) != "tiny_study"
    ]
    if strays:
        raise pytest.UsageError(f"tests reading tiny_study must live in {TINY_STUDY_FILES}: {strays}")
    rank = {group: i for i, group in enumerate(COSTLIEST_GROUPS)}
    items.sort(key=lambda item: rank.get(group_of(item.nodeid), len(rank)))  # stable: file order within a group


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """--dist loadscope with this suite's groups (pytest-xdist's own loadgroup cannot rename node ids on
    pytest 9, so its xdist_group markers are ignored there)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)
