"""The import layers of the package: the import-linter contract in pyproject.toml, and no module imports another
package's private names."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tokenreduce"


def test_import_layers_contract_holds():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint is not None, "import-linter is not installed: pip install -e '.[dev]'"
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 broken" in done.stdout


def _private_imports(path: Path) -> list[str]:
    """``from <another subpackage> import _name`` in ``path`` (relative or absolute imports)."""
    package = path.relative_to(PACKAGE.parent).parent.parts  # ("tokenreduce", "stvit") for stvit/model.py
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = package[: len(package) - node.level + 1] if node.level else ()
        target = (*base, *(node.module.split(".") if node.module else ()))
        if target[:1] != ("tokenreduce",) or target[:2] == package[:2]:
            continue  # another library, or the importer's own subpackage
        found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {'.'.join(target)}.{alias.name}"
                  for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_imports_another_packages_private_names():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _private_imports(path)]
    assert not found, "\n".join(found)
