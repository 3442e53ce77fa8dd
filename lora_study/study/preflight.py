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

from lora_study.core.errors import UserError
from lora_study.core.formats import BITSANDBYTES
from lora_study.study.methods import LORA, RSLORA
from lora_study.study.modules import (
    ALL_LINEAR,
    ARCHITECTURES,
    OUTPUT_HEAD,
    Layout,
    ModuleResolutionError,
    Targets,
    attention_problem,
    manifest_layout,
    names_match,
    resolve_run_targets,
)
from lora_study.study.sweep import RunSpec


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


def wrapped_names(targets: Targets, layer_names: Iterable[str]) -> frozenset[str]:
    """The per-layer linear layers (and 3-D expert weights) PEFT will wrap for `targets` among `layer_names`
    (a scoped regex stands for itself: its matches are checked on the built model)."""
    names = [name for name in layer_names if not names_match(name, OUTPUT_HEAD)]
    if targets.modules == ALL_LINEAR:
        wrapped = set(names)
    elif isinstance(targets.modules, str):
        wrapped = {targets.modules}
    else:
        wrapped = {n for n in names if any(names_match(n, t) for t in targets.modules)}
    return frozenset(wrapped | set(targets.parameters))


def same_wrapped_set(
    requested: dict[str, tuple[str, ...]], targets: dict[str, Targets], layer_names: Iterable[str],
    about: Iterable[str] | None = None,
) -> list[str]:  # fmt: skip
    """One line per pair of runs that ask for different modules but would wrap the same layers: their module
    axis measures nothing, and a report would read the identical results as a finding. `about`: only pairs
    involving these runs (a per-run check)."""
    names = list(layer_names)
    first_by_set: dict[frozenset[str], str] = {}
    problems = []
    for run_id, run_targets in targets.items():
        if not run_targets.modules and not run_targets.parameters:  # full fine-tuning: no modules
            continue
        key = wrapped_names(run_targets, names)
        other = first_by_set.setdefault(key, run_id)
        if other == run_id or requested[other] == requested[run_id]:
            continue
        if about is not None and run_id not in about and other not in about:
            continue
        problems.append(
            f"runs '{other}' ({', '.join(requested[other])}) and '{run_id}' ({', '.join(requested[run_id])}) would "
            f"train the same modules on this model ({', '.join(sorted(key))}); drop one, or name modules that "
            "differ"
        )
    return problems


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
    if layout is None or layout.optional:
        return False  # unknown, or a family whose checkpoints differ: checked on the prepared model (check_run)
    names = [*layout.declared_layers(), OUTPUT_HEAD]
    runs = list(runs)
    targets = _collect(runs, lambda run: check_run(run, layout, names, model_type, import_it=False))
    _refuse_same_wrapped_set(runs, targets, names)
    return True


def _refuse_same_wrapped_set(runs: Iterable[RunSpec], targets: dict[str, Targets], layer_names: Iterable[str],
                             about: Iterable[str] | None = None) -> None:  # fmt: skip
    requested = {run.run_id: tuple(run.modules) for run in runs if run.run_id in targets}
    problems = same_wrapped_set(requested, targets, layer_names, about)
    if problems:
        raise PreflightError("\n".join(problems))


def check_with_manifest(
    manifest: dict[str, Any], runs: Iterable[RunSpec], import_it: bool = True, study: Iterable[RunSpec] = ()
) -> dict[str, Targets]:
    """Every run's targets on the prepared model (its real module names); `import_it`: see quantization_problem.

    `study`: the study's other runs; a run that would wrap the same modules as one of them under a different
    request is refused (same_wrapped_set). Their own problems are left to their own checks.
    """
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

    runs = list(runs)
    targets = _collect(runs, check)
    others = {}
    for other in study:
        if other.run_id in targets or other.is_baseline:
            continue
        try:
            others[other.run_id] = check_run(other, layout, names, model_type, import_it=False)
        except ModuleResolutionError:
            continue
    _refuse_same_wrapped_set([*runs, *study], {**targets, **others}, names, about=targets)
    return targets
