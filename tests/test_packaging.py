"""setup.py declares what the code imports: ``pip install partialfc`` must run the default trainer.

The requirement lists are read from setup.py's source (no build, no network) and compared
with the third-party imports found in the package's own source.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("partialfc", "kernels")  # kernels/ installs as partialfc.kernels
# Import name -> distribution name, where they differ.
DISTRIBUTION = {"PIL": "pillow", "prometheus_client": "prometheus-client", "nvidia": "nvidia-dali-cuda120"}


def _setup_requirements():
    """(install_requires, {extra: requirements}) as distribution names, from setup.py's AST."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords
                if keyword.arg in ("install_requires", "extras_require")}

    def names(requirements):
        return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}

    extras = {extra: names(requirements) for extra, requirements in keywords["extras_require"].items()}
    return names(keywords["install_requires"]), extras


def _third_party_imports(module_level_only: bool):
    """{distribution name: files importing it} over the package source."""
    found = {}
    for directory in PACKAGE_DIRS:
        for path in sorted((REPO / directory).rglob("*.py")):
            tree = ast.parse(path.read_text())
            nodes = tree.body if module_level_only else ast.walk(tree)
            for node in nodes:
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    root = module.split(".")[0]
                    if root in sys.stdlib_module_names or root in PACKAGE_DIRS:
                        continue
                    name = DISTRIBUTION.get(root, root).lower()
                    found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


def test_the_default_trainer_needs_only_core_requirements():
    from partialfc.config import Config

    core, _ = _setup_requirements()
    # Metrics are on by default and build a Prometheus registry (partialfc/metrics.py), so
    # `pip install partialfc; torchrun -m partialfc.train` needs prometheus-client.
    assert Config().metrics.enabled
    assert "prometheus-client" in core
    imported_on_load = _third_party_imports(module_level_only=True)
    assert set(imported_on_load) <= core, {name: files for name, files in imported_on_load.items()
                                           if name not in core}


def test_every_imported_package_is_declared():
    core, extras = _setup_requirements()
    declared = core.union(*extras.values())
    undeclared = {name: files for name, files in _third_party_imports(module_level_only=False).items()
                  if name not in declared}
    assert not undeclared, f"imported but not in setup.py: {undeclared}"
