"""The package's rooms import downwards only, and no module imports itself back through another.

Layers, lowest first: the foundation (errors, choices, devices, files); model/; data/; distributed; rank/; recipe
and serving/; training/; then the command line (cli, doctor, plotting) and the package's public surface (__init__). A module may
import its own layer and those below it. Imports inside functions count too: they are how a cycle hides.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tsarank_engine"
LAYERS = [{"errors", "choices", "devices", "files"}, {"model"}, {"data"}, {"distributed"}, {"rank"},
          {"recipe", "serving"}, {"training"},
          {"cli", "doctor", "plotting", "__init__"}]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, Path]:
    """Dotted names under tsarank_engine (a room's __init__ by the room's name) -> file."""
    found = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The engine modules `name` imports (relative or absolute, at any depth of the file)."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "tsarank_engine":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from .room import module` names a module
                candidate = ".".join(target + [alias.name])
                found.add(candidate if candidate in known else ".".join(target) or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tsarank_engine":
                    found.add(".".join(alias.name.split(".")[1:]) or "__init__")
    return {f for f in found if f in known and f != name}


def layer(module: str) -> int:
    return LAYER[module.split(".")[0]]


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer():
    assert all(name.split(".")[0] in LAYER for name in modules()), sorted(modules())


def test_imports_run_downwards():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(path: list[str]) -> None:  # depth first; the modules on `path` are open
        state[path[-1]] = "open"
        for nxt in sorted(edges[path[-1]]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(path + [nxt])
        state[path[-1]] = "done"

    for node in sorted(edges):
        if node not in state:
            visit([node])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("room", ["model", "data", "rank", "training"])
def test_each_room_says_what_it_holds_and_may_import(room):
    doc = ast.get_docstring(ast.parse((PKG / room / "__init__.py").read_text()))
    assert doc and "import" in doc


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a model module importing the trainer is reported."""
    found = modules()
    text = found["model.decoder"].read_text() + "\nfrom ..training import trainer\n"
    bad = tmp_path / "decoder.py"
    bad.write_text(text)
    assert "training.trainer" in imports("model.decoder", bad, set(found))


def test_the_public_surface():
    import tsarank_engine
    import tsarank_engine.training.trainer  # noqa: F401  a room imported first must not hide a public name

    for name in ("Ranker", "load_model", "export_model", "train"):
        assert callable(getattr(tsarank_engine, name)), name


def test_each_choice_is_defined_once_and_implemented():
    """The names a user may choose (tsarank_engine/choices.py) are those the code implements."""
    import torch

    from tsarank_engine.choices import ATTENTION, BLOCK_OPS, DTYPES, WIDE_DTYPES
    from tsarank_engine.model.attention import ATTENTION_BACKENDS
    from tsarank_kernels.block_ops import IMPLS as BLOCK_OP_PATHS

    assert ATTENTION == ("auto", *ATTENTION_BACKENDS)
    assert BLOCK_OPS == ("auto", *BLOCK_OP_PATHS)
    assert set(WIDE_DTYPES) <= set(DTYPES) and all(isinstance(getattr(torch, d), torch.dtype) for d in DTYPES)
