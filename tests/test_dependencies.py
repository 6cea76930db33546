"""Declared dependencies: every third-party module the package and scripts import is declared in pyproject.toml,
and constraints.txt (the tested set `make setup` installs) pins each declared dependency to a version inside its
declared range, leaving torch (and what only torch pulls in) to the Makefile."""

import ast
import importlib.metadata
import re
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

# The extras a contributor installs (make setup: .[dev]) and the one the DeepSpeed engine needs.
EXTRAS = ("dev", "deepspeed")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared() -> dict[str, Requirement]:
    project = _project()
    lines = [*project["dependencies"], *(r for extra in EXTRAS for r in project["optional-dependencies"][extra])]
    requirements = {}
    for line in lines:
        requirement = Requirement(line)
        requirements.setdefault(canonicalize_name(requirement.name), requirement)
    return requirements


def _pins() -> dict[str, Version]:
    pins = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints.txt:{number}: {line!r} is not name==version"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _makefile(variable: str) -> str:
    match = re.search(rf"^{variable}\s*[?:]?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, f"Makefile sets no {variable}"
    return match.group(1).strip()


def test_constraints_pin_every_declared_dependency_inside_its_range():
    declared, pins = _declared(), _pins()
    outside = {name: str(pins[name]) for name, req in declared.items()
               if name in pins and not req.specifier.contains(pins[name], prereleases=True)}
    assert outside == {}
    assert sorted(name for name in declared if name not in pins) == ["torch"]  # the Makefile's, below
    torch_version = Version(_makefile("TORCH_VERSION"))
    assert declared["torch"].specifier.contains(torch_version), (torch_version, declared["torch"])


def test_the_accelerate_range_named_in_messages_is_the_declared_one():
    from dist_gacc import engines

    assert SpecifierSet(engines.ACCELERATE_TESTED) == _declared()["accelerate"].specifier


def test_constraints_leave_out_what_the_makefile_pins_or_keeps():
    unpinned = {canonicalize_name(name) for name in _makefile("UNPINNED").split()}
    embedded = {canonicalize_name(spec.split("==")[0]) for spec in _makefile("EMBEDDED").split()}
    assert "torch" in unpinned and embedded <= unpinned
    assert sorted(unpinned & set(_pins())) == [] and "dist-gacc" not in _pins()
    header = (ROOT / "constraints.txt").read_text().splitlines()[0]
    assert f"Python {_makefile('TESTED_PYTHON')}," in header


def _imported_modules(folder) -> dict[str, str]:
    """Top-level names of the absolute imports in a folder's Python files (first file that imports each)."""
    local = {path.stem for path in folder.glob("*.py")}
    modules = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    modules.setdefault(top, str(path.relative_to(ROOT)))
    return modules


def test_every_third_party_import_is_declared():
    distributions = importlib.metadata.packages_distributions()
    declared = set(_declared())
    modules = {**_imported_modules(ROOT / "scripts"), **_imported_modules(ROOT / "src")}
    undeclared = {}
    for module, path in modules.items():
        names = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if "dist-gacc" not in names and not names & declared:
            undeclared[module] = path
    assert undeclared == {}
    assert {"numpy", "pyarrow", "scipy", "torch", "transformers"} <= set(modules)
