"""The package's layout rules, checked on the source (issue 27):

* nothing imports a private module (``_name``) of a package it is not inside: a package's
  private modules are its own business (``dvgs_fast._utils`` is private to ``dvgs_fast``, so every
  module of the library may use it; ``dvgs_fast.methods._grad_training`` only ``dvgs_fast.methods.*``);
* the command line's modules import each other without a circle (deferred imports inside functions count too);
* the gradient methods reach the engine through its public names only (``dvgs_fast.grads``,
  ``dvgs_fast.runstate``, ``dvgs_fast.sources``), and DVGS's package holds only DVGS.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "dvgs_fast"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every dvgs_fast import in the file; `from X import y` gives
    X.y as well when y is a submodule."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            for a in node.names:
                sub = PKG.parent / Path(*(mod + "." + a.name).split("."))
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    out.append((mod + "." + a.name, node.lineno))
    return [(m, ln) for m, ln in out if m == "dvgs_fast" or m.startswith("dvgs_fast.")]


def _files():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_import_of_another_package_private_module():
    bad = []
    for path in _files():
        me = _module_name(path)
        for mod, line in _imports(path):
            parts = mod.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])          # the package the private module belongs to
                    if not (me == owner or me.startswith(owner + ".")):
                        bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod}")
                    break
    assert not bad, "private modules imported from outside their package:\n" + "\n".join(bad)


def test_cli_modules_have_no_import_circle():
    cli = PKG / "cli"
    graph = {}
    for path in cli.glob("*.py"):
        me = _module_name(path)
        graph[me] = {m for m, _ in _imports(path) if m.startswith("dvgs_fast.cli.")
                     and m != me}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
    assert len(graph) >= 10                              # the package was found and read


def test_gradient_methods_use_the_engine_public_surface():
    users = [PKG / "methods" / "tracin.py", PKG / "methods" / "in_run_shapley.py", *sorted((PKG / "compat").glob("*.py")),
             *sorted((PKG / "methods" / "trak").glob("*.py")),
             *sorted((PKG / "methods" / "dvgs").glob("*.py")), *sorted((PKG / "cli").glob("*.py"))]
    bad = []
    for path in users:
        for mod, line in _imports(path):
            for pkg in ("dvgs_fast.grads.", "dvgs_fast.runstate."):
                if mod.startswith(pkg) and mod != "dvgs_fast.grads.pairwise":
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod} (use {pkg[:-1]})")
            if mod.startswith("dvgs_fast.methods.dvgs.") and not _module_name(path).startswith("dvgs_fast.methods.dvgs"):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} reaches into DVGS's package ({mod})")
    assert not bad, "\n".join(bad)
    dvgs_files = {p.name for p in (PKG / "methods" / "dvgs").glob("*.py")}
    assert dvgs_files == {"__init__.py", "method.py", "prepare.py", "loop.py"}, dvgs_files
