"""Checks every run can start, before any job runs.

`check_at_start` runs while the workflow is parsed, from a local model
directory's config.json alone (no torch import: a no-op rerun stays fast).
Sources it cannot see into (hub ids, GGUF files) and families whose groups
must be inferred from the built model are checked by the `check_run` rule
(`check_with_manifest`), a light local job per run (no torch import) that its
training waits for.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_study.errors import UserError
from lora_study.formats import BITSANDBYTES
from lora_study.methods import LORA, RSLORA
from lora_study.modules import (
    ARCHITECTURES,
    OUTPUT_HEAD,
    Layout,
    ModuleResolutionError,
    Targets,
    attention_problem,
    manifest_layout,
    resolve_run_targets,
)
from lora_study.sweep import RunSpec


class PreflightError(UserError):
    """Runs that cannot start; one line per run, each naming the fix."""


def local_model_config(source: str) -> dict[str, Any] | None:
    """config.json of a local model directory; None for hub ids and GGUF files."""
    path = Path(source).expanduser()
    config_file = path / "config.json"
    if source.endswith(".gguf") or not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise PreflightError(f"model.source: cannot read {config_file}: {error}") from None


def quantization_problem(quantization: str, import_it: bool = False) -> str | None:
    """Why this installation cannot run `quantization`, or None.

    While the workflow is parsed the package is only looked up (importing it
    imports torch); jobs import it, which also catches a broken install.
    """
    if quantization not in BITSANDBYTES:
        return None
    fix = f"pip install bitsandbytes, or drop '{quantization}' from the sweep"
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"quantization '{quantization}' needs bitsandbytes, which is not installed: {fix}"
    if import_it:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as error:  # a broken install raises anything from OSError to RuntimeError
            return f"quantization '{quantization}' needs bitsandbytes, which cannot be imported here ({error}): {fix}"
    return None


def prequantized_method(model_config: dict[str, Any]) -> str | None:
    """The method a checkpoint was saved quantized with (gptq, awq, bitsandbytes, ...), or None."""
    quantization = model_config.get("quantization_config") or {}
    if not quantization:
        return None
    return str(quantization.get("quant_method") or "unknown method")


def _refuse_prequantized(method: str | None, source: str) -> None:
    if method is not None:
        raise PreflightError(
            f"model.source {source} is already quantized ({method}); the study quantizes the base model itself, "
            "so point model.source at the unquantized (16- or 32-bit) checkpoint"
        )


def check_run(
    run: RunSpec, layout: Layout | None, layer_names: Iterable[str], model_type: str, import_it: bool = True
) -> Targets:
    """The run's targets, after checking it can start at all (errors name the run and the fix)."""
    training = run.training
    assert training is not None
    # Methods a weight format cannot take were refused when the sweep was expanded (sweep._make_spec).
    problem = quantization_problem(run.quantization, import_it)
    if problem:
        raise ModuleResolutionError(f"run '{run.run_id}': {problem}")
    if run.is_full:
        return Targets("")  # every weight trains: nothing to resolve
    targets = resolve_run_targets(run.run_id, run.modules, layout, list(layer_names), model_type, training.lora_dropout)
    if run.method not in (LORA, RSLORA) and targets.parameters:
        raise ModuleResolutionError(
            f"run '{run.run_id}': {run.method} cannot adapt mixture-of-experts weights ({list(targets.parameters)}): "
            "PEFT supports only plain LoRA and rslora on them; target attention only, or use method lora"
        )
    return targets


def _collect(runs: Iterable[RunSpec], check) -> dict[str, Targets]:
    """check(run) for every trained run; all failures in one error, one line each."""
    targets, problems = {}, []
    for run in runs:
        if run.is_baseline:
            continue
        try:
            targets[run.run_id] = check(run)
        except ModuleResolutionError as error:
            problems.append(str(error))
    if problems:
        raise PreflightError("\n".join(problems))
    return targets


def check_at_start(model_source: str, runs: Iterable[RunSpec]) -> bool:
    """Check every run against a local known-family model's config.json; False when this needs the model."""
    model_config = local_model_config(model_source)
    if model_config is None:
        return False
    _refuse_prequantized(prequantized_method(model_config), model_source)
    model_type = model_config.get("model_type", "")
    layout = ARCHITECTURES.get(model_type)
    if layout is None:
        return False
    names = [*layout.declared_layers(), OUTPUT_HEAD]
    _collect(runs, lambda run: check_run(run, layout, names, model_type, import_it=False))
    return True


def check_with_manifest(
    manifest: dict[str, Any], runs: Iterable[RunSpec], import_it: bool = True
) -> dict[str, Targets]:
    """Every run's targets on the prepared model (its real module names); `import_it`: see quantization_problem."""
    _refuse_prequantized(manifest.get("prequantized"), manifest["source"])
    layout = manifest_layout(manifest)
    names, model_type = manifest["linear_layers"], manifest["model_type"]

    def check(run: RunSpec) -> Targets:
        targets = check_run(run, layout, names, model_type, import_it)
        assert run.training is not None
        problem = attention_problem(manifest, run.training.attn_implementation)
        if problem:
            raise ModuleResolutionError(f"run '{run.run_id}': {problem}")
        return targets

    return _collect(runs, check)
