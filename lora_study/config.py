"""Config validation against config/schema.yaml, with defaults filled in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def load_schema() -> dict[str, Any]:
    with SCHEMA_PATH.open() as handle:
        return yaml.safe_load(handle)


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


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate `config` in place, fill defaults, and return it.

    Raises ConfigError with one message naming the offending key.
    """
    if not isinstance(config, dict) or not config:
        raise ConfigError("config is empty: pass --configfile or keep config/config.yaml")
    validator = _validator_with_defaults(load_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(f"config key '{key_path(error.absolute_path)}': {error.message}")
    return config


def canonical_json(value: Any) -> str:
    """One text per value: sorted keys, fixed separators, floats by repr.

    Snakemake compares params as text, so reordered or reformatted YAML must
    serialise identically to avoid spurious reruns.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
