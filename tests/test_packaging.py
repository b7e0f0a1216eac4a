"""pyproject.toml says what the package is and needs: its license, every third-party import, no guessed caps."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "lightning_fedprune"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

#: import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "espeakng_loader": "espeakng-loader", "typing_extensions": "typing-extensions"}
#: declared although the package never imports them, and why
NOT_IMPORTED = {"jsonargparse": "LightningCLI (`fedprune`) needs it; Lightning declares it only as an extra"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports() -> set[str]:
    first_party = {"lightning_fedprune"}
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top not in first_party:
                    found.add(top)
    return found


def _declared(extras: bool) -> set[str]:
    names = {_name(r) for r in PROJECT["dependencies"]}
    if extras:
        for group, reqs in PROJECT["optional-dependencies"].items():
            names |= {_name(r) for r in reqs if not r.startswith("lightning-fedprune")}
    return names


def test_license_is_the_apache_text_and_a_pep_639_expression():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # PEP 639: the expression only
    (setuptools,) = [r for r in PYPROJECT["build-system"]["requires"] if _name(r) == "setuptools"]
    assert int(re.search(r">=\s*(\d+)", setuptools).group(1)) >= 77  # the first setuptools with PEP 639
    assert PROJECT["urls"] and all(u.startswith("https://") for u in PROJECT["urls"].values())


def test_every_third_party_import_is_declared():
    declared = _declared(extras=True)
    missing = sorted(i for i in _third_party_imports() if DISTRIBUTION.get(i, i).lower().replace("_", "-") not in declared)
    assert not missing, f"imported by lightning_fedprune but not in pyproject.toml: {missing}"


def test_every_core_dependency_is_used():
    imported = {DISTRIBUTION.get(i, i).lower().replace("_", "-") for i in _third_party_imports()}
    unused = sorted(d for d in _declared(extras=False) if d not in imported and d not in NOT_IMPORTED)
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"


def test_no_upper_bounds_without_a_known_break():
    requirements = [*PROJECT["dependencies"], *(r for reqs in PROJECT["optional-dependencies"].values() for r in reqs)]
    capped = [r for r in requirements if "<" in r.split(";")[0]]
    assert not capped, capped


def test_dev_extra_installs_the_docs_tools():
    assert PROJECT["optional-dependencies"]["dev"] == ["lightning-fedprune[asr,test,flower,docs]"]
    assert {_name(r) for r in PROJECT["optional-dependencies"]["docs"]} >= {"mkdocs", "mkdocstrings"}
