"""No module of this repository shadows an installed package.

Python puts the folder of the script it runs (or the working directory, for `python -c` and `python -m`) first on
sys.path, and pytest puts tests/ there. A module or regular package of ours in such a folder whose name is also
an installed distribution's top-level name wins that import for the whole process: transformers 5.25 imported
our `kernels` (then the top-level kernels/ package and bench/kernels.py) instead of the PyPI package it needs.
These tests catch the next such collision in CI, against whatever is installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders that reach sys.path[0]: the root (python -m pytest, python -c, torchrun -m tsarank_engine.cli),
# a bench script's folder, tests/ (pytest's rootdir insertion), and kernels/ (gpu_check.sh without an install).
FOLDERS = {"root": ROOT, "bench": ROOT / "bench", "tests": ROOT / "tests", "kernels": ROOT / "kernels"}
OURS = {"tsarank_engine", "tsarank_kernels"}


def installed_names() -> dict[str, list[str]]:
    """Top-level import name -> the installed distributions providing it, other than this project."""
    names = {}
    for name, dists in importlib.metadata.packages_distributions().items():
        others = [d for d in dists if d.lower().replace("_", "-") != "tsarank-engine"]
        if others and name.isidentifier() and name not in OURS:
            names[name] = others
    return names


def regular_names(folder: Path) -> set[str]:
    """Names importable from `folder` as a module or a regular package (a folder without __init__.py is only a
    namespace portion, which never takes precedence over an installed module or package)."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return {n for n in names if n.isidentifier()}


def test_installed_names_are_seen() -> None:
    # The check below is only as good as this list: the test environment installs at least these.
    names = installed_names()
    assert {"torch", "numpy", "safetensors", "tokenizers", "click"} <= names.keys(), sorted(names)


@pytest.mark.parametrize("where", sorted(FOLDERS))
def test_no_module_of_ours_has_an_installed_name(where: str) -> None:
    folder = FOLDERS[where]
    installed = installed_names()
    clashes = {name: installed[name] for name in regular_names(folder) if name in installed}
    assert not clashes, f"modules in {folder} take the names of installed packages: {clashes}"


_RESOLVE = """
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
found = {}
for name in json.loads(sys.argv[2]):
    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # a broken installed package is not ours to judge
        continue
    if spec is None:
        continue
    places = [spec.origin or ""] + list(spec.submodule_search_locations or [])
    found[name] = [p for p in places if p]
print(json.dumps(found))
"""


@pytest.mark.parametrize("where", sorted(FOLDERS))
def test_every_installed_name_resolves_outside_the_repository(where: str) -> None:
    """In a fresh process started in `where` with that folder first on sys.path, each installed top-level name
    resolves to the installed copy (find_spec locates without importing)."""
    folder = FOLDERS[where]
    names = sorted(installed_names())
    out = subprocess.run([sys.executable, "-c", _RESOLVE, str(folder), json.dumps(names)], cwd=folder,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    found = json.loads(out)
    ours = {name: places for name, places in found.items()
            if any(Path(p).resolve().is_relative_to(ROOT) for p in places)}
    assert not ours, f"from {folder}, these installed names resolve into the repository: {ours}"
    assert "torch" in found


def test_the_pypi_kernels_package_is_the_one_imported(tmp_path: Path) -> None:
    """The collision that broke the test command: from the root and from bench/, `import kernels` gives the
    installed package (when one is installed) and `import tsarank_kernels` gives ours."""
    if "kernels" not in installed_names():
        pytest.skip("the PyPI package `kernels` is not installed here; the general checks above still run")
    for folder in (ROOT, ROOT / "bench"):
        out = subprocess.run([sys.executable, "-c", "import kernels, tsarank_kernels; "
                              "print(kernels.__file__); print(tsarank_kernels.__file__)"],
                             cwd=folder, capture_output=True, text=True, timeout=120, check=True).stdout.split()
        assert not Path(out[0]).resolve().is_relative_to(ROOT), out[0]
        assert Path(out[1]).resolve().is_relative_to(ROOT / "kernels" / "tsarank_kernels"), out[1]
