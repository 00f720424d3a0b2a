"""The repository itself: no absolute path of a machine in it, and .ci/lowest's reading of pyproject.toml on the
Pythons the package claims (3.10 has no tomllib)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Home and work folders of a machine (written in pieces so that this file does not match itself).
MACHINE_PATH = re.compile("|".join(["/" + "work/", "/" + "home/", "/" + "Users/", "/" + "root/",
                                    r"[A-Za-z]:\\" + "Users"]))
# Folders made by tools, not the project's files (all git-ignored).
SKIP_DIRS = {".git", ".venv", "build", "dist", "mutants", "out", "__pycache__", ".pytest_cache", ".ruff_cache",
             ".hypothesis", "node_modules"}
BINARY = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".pt", ".pth", ".safetensors", ".onnx", ".npz", ".npy", ".gz",
          ".zip", ".whl", ".pdf"}


def project_files() -> list[Path]:
    """The files of the repository: git's tracked and untracked-but-not-ignored files when git knows the folder,
    else every file under it outside the tools' folders."""
    git = shutil.which("git")
    if git is not None:
        done = subprocess.run([git, "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                              capture_output=True, timeout=60)
        if done.returncode == 0 and done.stdout:
            return [ROOT / name for name in done.stdout.decode().split("\0") if name and (ROOT / name).is_file()]
    return [p for p in ROOT.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts)
            and not p.name.endswith(".egg-info")]


def test_no_absolute_machine_path_in_the_repository():
    """Code (src, tests, benchmarks, .ci, Makefile, toml, md) and the committed results name data by a setting
    (``tokenreduce.measure.data.data_root``: --data-root, $TOKENREDUCE_DATA_ROOT, ../shared), never by where
    it sits on one machine."""
    files = project_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"src/tokenreduce/measure/data.py", "tests/conftest.py", "benchmarks/frontier.py", "Makefile",
            "pyproject.toml", ".ci/lowest"} <= names
    assert any(n.startswith("benchmarks/results/") and n.endswith(".json") for n in names)
    found = []
    for path in files:
        if path.suffix.lower() in BINARY:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            match = MACHINE_PATH.search(line)
            if match:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not found, "absolute machine paths (use tokenreduce.measure.data.data_root / portable_path):\n" + \
        "\n".join(found)


def test_the_pattern_finds_what_it_should():
    for text in ("/" + "work/shared/models/x", "data at /" + "home/me/shared", "/" + "Users/me/x",
                 "C:" + "\\Users\\me"):
        assert MACHINE_PATH.search(text), text
    for text in ("../shared/models/x", "$TOKENREDUCE_DATA_ROOT/data", "~/.cache/tokenreduce", "src/tokenreduce/work"):
        assert not MACHINE_PATH.search(text), text


# --- .ci/floors.py: .ci/lowest's reader of the declared floors ---------------------------------------------------

def load_floors():
    spec = importlib.util.spec_from_file_location("ci_floors", ROOT / ".ci" / "floors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PYPROJECT = ROOT / "pyproject.toml"


def test_fallback_reads_the_dependencies_as_tomllib_does():
    floors = load_floors()
    text = PYPROJECT.read_text()
    tomllib = pytest.importorskip("tomllib")  # 3.11+: the reference
    assert floors.project_dependencies_fallback(text) == tomllib.loads(text)["project"]["dependencies"]
    assert floors.floors(floors.project_dependencies_fallback(text))["torch"] == \
        re.search(r'"torch>=([0-9.]+)"', text).group(1)


def test_without_tomllib_and_tomli_the_fallback_is_used(monkeypatch):
    """Python 3.10 without tomli: both imports fail, and the floors still come out."""
    floors = load_floors()
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` raises ImportError
    monkeypatch.setitem(sys.modules, "tomli", None)
    calls = []
    fallback = floors.project_dependencies_fallback
    monkeypatch.setattr(floors, "project_dependencies_fallback", lambda text: calls.append(1) or fallback(text))
    got = floors.floors(floors.project_dependencies(PYPROJECT.read_text()))
    assert calls and {"torch", "torchvision", "timm"} <= set(got)


def test_fallback_on_a_harder_text():
    floors = load_floors()
    text = '''
[build-system]
requires = ["setuptools>=77"]
dependencies = ["not-this>=9"]   # another table's key

[project]   # the table
name = "x"
dependencies = [  # comment after the bracket
    "torch>=2.3.1",   # a comment with ] and , and "quotes"
    'timm>=1.0.23',
    "extra[with,brackets]>=1; python_version < \\"3.11\\"",

    "torchvision>=0.18.1",
]
[project.optional-dependencies]
dev = ["pytest>=8"]
'''
    deps = floors.project_dependencies_fallback(text)
    assert deps == ["torch>=2.3.1", "timm>=1.0.23", 'extra[with,brackets]>=1; python_version < "3.11"',
                    "torchvision>=0.18.1"]
    assert floors.floors(deps) == {"torch": "2.3.1", "timm": "1.0.23", "torchvision": "0.18.1"}
    with pytest.raises(ValueError, match="no \\[project\\] dependencies"):
        floors.project_dependencies_fallback("[tool.x]\ndependencies = []\n")
    with pytest.raises(ValueError, match="not closed"):
        floors.project_dependencies_fallback('[project]\ndependencies = ["a>=1",\n')
    with pytest.raises(ValueError, match="unexpected"):
        floors.project_dependencies_fallback("[project]\ndependencies = [a]\n")


def test_floors_script_prints_the_three_floors():
    done = subprocess.run([sys.executable, str(ROOT / ".ci" / "floors.py"), str(PYPROJECT)], capture_output=True,
                          text=True, timeout=60, check=True)
    floor = load_floors().floors(load_floors().project_dependencies(PYPROJECT.read_text()))
    assert done.stdout.split() == [floor["torch"], floor["torchvision"], floor["timm"]]
