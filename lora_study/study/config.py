"""Config validation against config/schema.yaml, with defaults filled in."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from lora_study.core.errors import UserError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


class ConfigError(UserError):
    """A config value is invalid; the message names the key."""


def load_schema() -> dict[str, Any]:
    """config/schema.yaml, with the grids' training axes derived from the training settings."""
    with SCHEMA_PATH.open() as handle:
        schema = yaml.safe_load(handle)
    schema["$defs"]["training_axes"] = training_axes_schema(schema["$defs"]["training"])
    return schema


def training_axes_schema(training: dict[str, Any]) -> dict[str, Any]:
    """Every training setting as a grid axis: a non-empty list of values valid for that setting."""
    axes = {
        key: {"type": "array", "minItems": 1, "uniqueItems": True, "items": setting}
        for key, setting in training["properties"].items()
    }
    return {
        "description": "Training settings as grid axes (any key of `training`, a list of values each).",
        "type": "object",
        "additionalProperties": False,
        "properties": axes,
        "default": {},
    }


@functools.cache
def training_defaults(method: str = "lora") -> dict[str, Any]:
    """The schema's default of every training setting for `method` (what run ids are relative to).

    Full fine-tuning's schema default learning rate counts as its default; a
    config's own `training` or `methods` values never do.
    """
    properties = load_schema()["properties"]
    defaults = {key: spec["default"] for key, spec in properties["training"]["properties"].items()}
    method_schema = properties["methods"]["properties"].get(method, {})
    defaults.update({key: spec["default"] for key, spec in method_schema.get("properties", {}).items()})
    return defaults


def _validator_with_defaults(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    # jsonschema's documented recipe: fill `default` values while validating.
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, json.loads(json.dumps(subschema["default"])))
        yield from validate_properties(validator, properties, instance, schema)

    extended = jsonschema.validators.extend(base, {"properties": set_defaults})
    return extended(schema)


def key_path(path: Any) -> str:
    """Render a jsonschema error path as `sweep.grids[0].rank`."""
    rendered = ""
    for part in path:
        rendered += f"[{part}]" if isinstance(part, int) else (f".{part}" if rendered else str(part))
    return rendered or "<top level>"


def _readable(error: jsonschema.ValidationError) -> str:
    """jsonschema's message, or the schema's description where a raw pattern would be cryptic."""
    if error.validator == "pattern":
        described = next((s["description"] for s in _parent_schemas(error) if "description" in s), None)
        if described:
            return f"{error.instance!r} is not valid: {' '.join(described.split())}"
    return error.message


def _parent_schemas(error: jsonschema.ValidationError) -> list[dict[str, Any]]:
    schemas = [error.schema]
    parent = error.parent
    while parent is not None:
        schemas.append(parent.schema)
        parent = parent.parent
    return [s for s in schemas if isinstance(s, dict)]


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate `config` in place, fill defaults, and return it.

    Raises ConfigError with one message naming the offending key.
    """
    if not isinstance(config, dict) or not config:
        raise ConfigError("config is empty: pass --configfile or keep config/config.yaml")
    _check_removed_keys(config)
    validator = _validator_with_defaults(load_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(f"config key '{key_path(error.absolute_path)}': {_readable(error)}")
    return config


# Keys earlier versions accepted, with what replaced them.
REMOVED_KEYS = {
    ("sweep", "baseline_quantization"): "the base model is now evaluated once per weight format the runs use "
    "(base-nf4, base-int8, base-16bit, ...); delete the key",
}


def _check_removed_keys(config: dict[str, Any]) -> None:
    for (section, key), replacement in REMOVED_KEYS.items():
        if isinstance(config.get(section), dict) and key in config[section]:
            raise ConfigError(f"config key '{section}.{key}' was removed: {replacement}")


PATH_PREFIXES = ("/", "./", "../", "~")
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


def check_local_sources(config: dict[str, Any]) -> None:
    """Model and data sources that name local paths must exist (hub ids are checked when fetched).

    Run when the workflow starts, so a typo costs a second, not a job.
    """
    model_source = config["model"]["source"]
    is_path = model_source.startswith(PATH_PREFIXES) or model_source.endswith(".gguf")
    if is_path and not Path(model_source).expanduser().exists():
        raise ConfigError(f"config key 'model.source': path not found: {model_source}")
    data_source = config["dataset"]["source"]
    if data_source.endswith(LOCAL_DATA_SUFFIXES) and not Path(data_source).expanduser().is_file():
        raise ConfigError(f"config key 'dataset.source': file not found: {data_source}")


def canonical_json(value: Any) -> str:
    """One text per value: sorted keys, fixed separators, floats by repr.

    Snakemake compares params as text, so reordered or reformatted YAML must
    serialise identically to avoid spurious reruns.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
