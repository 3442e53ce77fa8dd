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

from lora_study.datagen import generate_examples  # noqa: E402

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
    # MPT: attention in one Wqkv layer, a name no standard convention places.
    "mpt": dict(d_model=64, n_heads=4, n_layers=1, expansion_ratio=2, max_seq_len=512),
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
    """A whole study in seconds on a small data slice: every sweep axis, 4 trained runs + baseline."""
    return {
        "model": {"source": str(model_dir)},
        "dataset": {
            "source": "generated",
            "generated_examples": 240,
            "validation_size": 24,
            "template": "chat",
            "max_length": 128,
        },
        "training": {"max_steps": 3, "batch_size": 4, "warmup_steps": 0, "log_every": 1},
        "evaluation": {"batch_size": 8, "exact_match_examples": 8, "max_new_tokens": 8},
        "sweep": {
            "baseline": True,
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
        *args,
    ]  # fmt: skip


def snakemake_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_TOKEN": FAKE_HUB_TOKEN}


def run_snakemake(
    workdir: Path, *args: str, timeout: float = 300, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """The real workflow, in `workdir`, with this repository's Snakefile."""
    command = snakemake_command(workdir, *args)
    env = {**snakemake_env(), **(extra_env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir)


@pytest.fixture(scope="session")
def tiny_study(tiny_llama, tmp_path_factory) -> Path:
    """The whole workflow run once on the tiny Llama; tests read its results."""
    import yaml

    workdir = tmp_path_factory.mktemp("study")
    (workdir / "config.yaml").write_text(yaml.safe_dump(tiny_study_config(tiny_llama)))
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return workdir
