"""Every third-party module lsdc's packages import is declared in pyproject.toml, in the role that needs it: a module
that merely arrives with another package's requirements (google-crc32c came with zarr) is one upgrade from gone."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = {"cache", "prep", "train", "lsdc"}


def _imports(package: str) -> set[str]:
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - OURS - set(sys.stdlib_module_names) - {"__future__"}


def _declared() -> dict[str, set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"base": project["dependencies"], **project["optional-dependencies"]}
    name = re.compile(r"^[A-Za-z0-9_.\-]+")
    return {g: {name.match(r).group(0).lower().replace("_", "-") for r in reqs} for g, reqs in groups.items()}


def test_every_imported_module_is_declared_in_its_role():
    dists = {k: {d.lower().replace("_", "-") for d in v} for k, v in packages_distributions().items()}
    declared = _declared()
    # which roles a package's modules may rely on (cache: the base install; prep: base + prep; ...)
    roles = {"cache": {"base", "notebook"}, "prep": {"base", "prep"}, "train": {"base", "train", "eval", "notebook"},
             "lsdc": {"base", "prep", "train", "eval", "notebook"}}
    missing = {}
    for package, allowed in roles.items():
        have = set().union(*(declared[r] for r in allowed))
        for module in sorted(_imports(package)):
            if not dists.get(module, set()) & have:
                missing.setdefault(package, []).append(f"{module} (distribution {sorted(dists.get(module, {'?'}))})")
    assert missing == {}


def test_crc32c_is_a_base_requirement():
    assert "google-crc32c" in _declared()["base"]
