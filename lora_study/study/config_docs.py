"""Reference pages generated from the workflow itself, so they cannot drift from it (`make docs` writes both;
tests/test_docs.py fails when either is stale):

- config/README.md from config/schema.yaml: every key with its type, default and description;
- docs/rulegraph.md from Snakemake's rule graph: the rules and what feeds what, as a Mermaid flowchart.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from typing import Any

import yaml

from lora_study.study.config import SCHEMA_PATH

HEADER = """# Configuration keys

Every key of a study's config file, generated from `config/schema.yaml` (the schema the workflow validates
each config against before any job runs; the defaults below are filled in then). `config/config.yaml` is the
default study; `config/phi2-alpaca.yaml` the reference study's setting on a GPU. How sweeps expand into runs and
run ids, model sources and the supported families: [docs/configuration.md](../docs/configuration.md).

Regenerate after editing the schema: `make docs`.
"""

# Definitions documented once, under `training`; every other use points there.
SHARED = ("#/$defs/training", "#/$defs/training_axes")


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _value(value: Any) -> str:
    return "`" + json.dumps(value).replace("|", "\\|") + "`"


def _type_text(node: dict[str, Any], defs: dict[str, Any]) -> str:
    """'integer ≥ 1', 'one of `nf4`, `fp4`', 'list of integer', ... from one schema node."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return _type_text(defs[name], defs) if name not in ("training", "training_axes") else "mapping"
    if "enum" in node:
        return "one of " + ", ".join(_value(v) for v in node["enum"])
    if "const" in node:
        return _value(node["const"])
    if "oneOf" in node:
        return " or ".join(_type_text(option, defs) for option in node["oneOf"])
    kinds = node.get("type", "any")
    kinds = [k for k in (kinds if isinstance(kinds, list) else [kinds]) if k != "null"]
    text = " or ".join("list" if k == "array" else "mapping" if k == "object" else k for k in kinds) or "null"
    if "array" in kinds and "items" in node:
        text = text.replace("list", f"list of {_type_text(node['items'], defs)}", 1)
    bounds = [(key, sign) for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
                                            ("exclusiveMaximum", "<")) if key in node]  # fmt: skip
    text += ",".join(f" {sign} {node[key]}" for key, sign in bounds)
    if _nullable(node):
        text += ", or null"
    return text


def _nullable(node: dict[str, Any]) -> bool:
    kinds = node.get("type")
    return isinstance(kinds, list) and "null" in kinds


def _description(node: dict[str, Any], defs: dict[str, Any]) -> str:
    if "description" in node:
        return _one_line(node["description"])
    if "$ref" in node:
        ref = node["$ref"]
        if ref in SHARED:
            return (
                "any key of [`training`](#training)"
                if ref.endswith("training")
                else "any key of [`training`](#training), a list of values"
            )
        return _description(defs[ref.rsplit("/", 1)[-1]], defs)
    if "items" in node:  # a list axis: what one of its values is
        return _description(node["items"], defs)
    return ""


def rows(node: dict[str, Any], path: str, defs: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, description) for `node` and every key below it, depth first, in schema order."""
    target = node
    if "$ref" in node and node["$ref"] not in SHARED:
        target = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    default = _value(target["default"]) if "default" in target else ""
    yield path, _type_text(target, defs), default, _description(target, defs)
    if "$ref" in node and node["$ref"] in SHARED:
        return
    children = target.get("properties") or target.get("items", {}).get("properties") or {}
    prefix = f"{path}[]." if "properties" not in target and children else f"{path}."
    named = target.get("additionalProperties")
    if not children and isinstance(named, dict) and named.get("properties"):  # a mapping of named entries
        children, prefix = named["properties"], f"{path}.<name>."
    for key, child in children.items():
        yield from rows(child, prefix + key, defs)


def _table(entries: list[tuple[str, str, str, str]]) -> str:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {kind} | {default} | {text} |" for key, kind, default, text in entries]
    return "\n".join(lines)


def render(schema: dict[str, Any]) -> str:
    """The whole page: one section per top-level key, the training settings under `training`."""
    defs = schema["$defs"]
    sections = [HEADER]
    for name, node in schema["properties"].items():
        required = " (required)" if name in schema.get("required", []) else ""
        entries = list(rows(node, name, defs))
        if name == "training":  # the shared settings (defaults here), also valid per method, per run and as axes
            defaults = node.get("properties", {})
            entries += [row for key, child in defs["training"]["properties"].items()
                        for row in rows({**child, **defaults.get(key, {})}, f"training.{key}", defs)]  # fmt: skip
        intro = entries[0][3]
        sections.append(f"## `{name}`{required}\n\n" + (f"{intro}\n\n" if intro else "") + _table(entries[1:]))
    return "\n\n".join(sections) + "\n"


RULEGRAPH_HEADER = """# Rule graph

The rules of a study with every optional stage on (`config/downstream.yaml`: lm-eval tasks, the merge check and
serving cost), an arrow from each rule to the rules that read its outputs. `track` joins after `findings` when
`tracking.mlflow` is set. Regenerate with `make docs`.
"""


def rule_edges(dot: str) -> list[tuple[str, str]]:
    """(producer, consumer) rule names from `snakemake --rulegraph` (DOT), sorted: the graph without its
    layout, whose node numbers and colours change from call to call."""
    names = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', dot, flags=re.M))
    return sorted({(names[a], names[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", dot, flags=re.M)})


def render_rulegraph(dot: str) -> str:
    lines = ["```mermaid", "flowchart LR"] + [f"    {a} --> {b}" for a, b in rule_edges(dot)] + ["```"]
    return RULEGRAPH_HEADER + "\n" + "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:] == ["rulegraph"]:  # snakemake --rulegraph ... | python -m lora_study.study.config_docs rulegraph
        print(render_rulegraph(sys.stdin.read()), end="")
        return
    with SCHEMA_PATH.open() as handle:
        print(render(yaml.safe_load(handle)), end="")


if __name__ == "__main__":
    main()
