"""The project's dependency declarations agree with each other."""

from __future__ import annotations

import importlib.metadata
import json
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement


def _normalized(requirement: str) -> tuple[str, str, str]:
    parsed = Requirement(requirement)
    name = re.sub(r"[-_.]+", "-", parsed.name).lower()
    return name, str(parsed.specifier), str(parsed.marker or "")


def _requirements_txt(path: Path) -> set[tuple[str, str, str]]:
    lines = path.read_text().splitlines()
    return {_normalized(line) for line in lines if line.strip() and not line.startswith("#")}


def test_functions_requirements_match_pyproject(repo_root: Path) -> None:
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    expected = {_normalized(r) for r in [*project["dependencies"], *extras["aml"], *extras["app"]]}
    assert _requirements_txt(repo_root / "requirements.txt") == expected


def test_every_dependency_has_lower_and_upper_bounds(repo_root: Path) -> None:
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        declared.extend(extra)
    for requirement in declared:
        operators = {spec.operator for spec in Requirement(requirement).specifier}
        pinned = "==" in operators
        assert pinned or (operators & {">=", ">"} and operators & {"<", "<="}), requirement


def test_azurite_is_pinned_and_locked(repo_root: Path) -> None:
    package = json.loads((repo_root / "package.json").read_text())
    version = package["devDependencies"]["azurite"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "pin an exact Azurite version"
    lock = json.loads((repo_root / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/azurite"]["version"] == version


# The orchestrator's cancel handling depends on how this SDK completes a repeated external-event
# wait (DESIGN.md, "Facts about Azure"): every place that names it must name the version the
# replay tests (tests/durable_replay.py) ran against, exactly.
_DURABLE = "azure-functions-durable"


def _pins(lines: list[str], name: str) -> list[str]:
    found = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parsed = Requirement(line)
        if re.sub(r"[-_.]+", "-", parsed.name).lower() == name:
            found.append(str(parsed.specifier))
    return found


def test_durable_sdk_is_pinned_to_the_version_the_replay_tests_ran(repo_root: Path) -> None:
    tested = importlib.metadata.version(_DURABLE)
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        declared.extend(extra)
    places = {
        "pyproject.toml": _pins(declared, _DURABLE),
        "requirements.txt": _pins(
            (repo_root / "requirements.txt").read_text().splitlines(), _DURABLE
        ),
        "node_image/requirements.txt": _pins(
            (repo_root / "node_image/requirements.txt").read_text().splitlines(), _DURABLE
        ),
    }
    for place, pins in places.items():
        assert pins == [f"=={tested}"], f"{place} pins {_DURABLE} {pins}, the tests ran {tested}"
