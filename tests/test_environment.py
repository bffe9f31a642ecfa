"""environment.yml (conda users) declares the same packages and lower bounds as pyproject.toml (make setup)."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}


def _requirements(specs: list[str]) -> dict[str, str]:
    parsed = {}
    for spec in specs:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", spec.strip())
        parsed[match.group(1).lower()] = match.group(2).replace(" ", "")
    return parsed


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _requirements(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    declared = _requirements([d for d in conda if not d.startswith(("python=", "pip"))] +
                             [d for d in pip if not d.startswith("-e")])
    assert {name: declared.get(CONDA_NAMES.get(name, name)) for name in wanted} == wanted
    assert "-e ." in pip
