"""Every third-party module the product imports is installed by its runtime
dependencies (``pip install .``), not only by the test extras: the README's
first command installs no test packages, and a module missing there stops
``pacs serve`` at start-up."""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
import tomllib

from packaging.requirements import Requirement

from .peers import ROOT

PRODUCT = ("storage", "pacs", "dicom_scp", "worklist", "ris_bridge", "viewer_api", "sample_studies")


def _runtime_closure() -> set[str]:
    """Normalised names of the runtime requirements and everything they pull in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = md.Distribution.from_name(req.name).metadata["Name"].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for text in md.requires(req.name) or []:
            sub = Requirement(text)
            environment = {"extra": ""}
            if sub.marker is not None and not any(
                sub.marker.evaluate({**environment, "extra": extra}) for extra in ("", *req.extras)
            ):
                continue
            try:
                md.distribution(sub.name)
            except md.PackageNotFoundError:
                continue  # not installed here, so nothing can import it
            todo.append(sub)
    return seen


def _imported_top_level_modules() -> dict[str, str]:
    """Top-level module -> one file of the product that imports it."""
    found: dict[str, str] = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_product_imports_are_runtime_dependencies() -> None:
    runtime = _runtime_closure()
    providers = md.packages_distributions()
    missing = []
    for module, where in sorted(_imported_top_level_modules().items()):
        if module in sys.stdlib_module_names or module in PRODUCT:
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if not dists & runtime:
            missing.append(f"{module} (imported by {where}; from {sorted(dists) or 'nothing installed'})")
    assert not missing, "imported but not a runtime dependency in pyproject.toml: " + "; ".join(missing)
