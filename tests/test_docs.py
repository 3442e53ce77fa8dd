"""The reference pages generated from the workflow are current, and every link in the docs leads somewhere."""

import re
import shutil

import yaml

from conftest import REPO, run_snakemake


def test_config_readme_is_what_the_schema_generates():
    from lora_study.study.config import SCHEMA_PATH
    from lora_study.study.config_docs import render

    expected = render(yaml.safe_load(SCHEMA_PATH.read_text()))
    written = (REPO / "config" / "README.md").read_text()
    assert written == expected, "regenerate: python -m lora_study.study.config_docs > config/README.md"


def test_config_readme_documents_every_key_the_schema_accepts():
    """Every key a config may set has a row with a description, down to grid axes and named-run fields."""
    from lora_study.study.config import load_schema

    page = (REPO / "config" / "README.md").read_text()
    documented = dict(re.findall(r"^\| `([^`]+)` \|[^|]*\|[^|]*\| (.*) \|$", page, flags=re.M))

    def keys(node, path):
        for key, child in node.get("properties", {}).items():
            yield f"{path}{key}"
            ref = child.get("$ref", "")
            if ref.endswith(("/training", "/training_axes")):
                continue  # documented once, under `training`
            if "$ref" in child:
                child = schema["$defs"][ref.rsplit("/", 1)[-1]]
            nested = child if "properties" in child else child.get("items", {})
            yield from keys(nested, f"{path}{key}." if "properties" in child else f"{path}{key}[].")

    schema = load_schema()
    accepted = [*keys(schema, ""), *(f"training.{key}" for key in schema["$defs"]["training"]["properties"])]
    top_level = set(schema["properties"])
    missing = [key for key in accepted if key not in top_level and key not in documented]
    undescribed = [key for key in accepted if key not in top_level and not documented.get(key, "x").strip()]
    assert not missing and not undescribed
    assert len(accepted) > 100


def test_rulegraph_page_is_the_workflows_rule_graph(tmp_path):
    from lora_study.study.config_docs import render_rulegraph, rule_edges

    shutil.copy(REPO / "config" / "downstream.yaml", tmp_path / "config.yaml")
    result = run_snakemake(tmp_path, "--rulegraph", "--cores", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    edges = rule_edges(result.stdout)
    assert ("train", "evaluate") in edges and ("evaluate", "deploy") in edges and len(edges) > 20
    assert (REPO / "docs" / "rulegraph.md").read_text() == render_rulegraph(result.stdout), "regenerate: make docs"


def test_every_relative_link_in_the_docs_leads_to_a_file_and_heading():
    pages = [REPO / "README.md", REPO / "config" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}
