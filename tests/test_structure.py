"""The layout a newcomer relies on: webui/ -> backends/ -> kernels/, imports pointing downward only and never
in a circle, and tests and benchmarks using the public names of the product."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("webui", "backends", "kernels")  # each may import only those after it
PRODUCT = LAYERS


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)


def product_modules() -> set[str]:
    return {module_name(p) for p in sources(*PRODUCT)}


def imports(path: Path, known: set[str]) -> list[tuple[str, str, int]]:
    """(module, imported name or "", line) for every import in the file, at any depth; ``from a import b`` is
    the module ``a.b`` where that is a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in known else (node.module, alias.name, node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    known = product_modules()
    graph: dict[str, set[str]] = {}
    for path in sources(*PRODUCT):
        graph[module_name(path)] = {m for m, _, _ in imports(path, known) if m in known}
    return graph


def test_imports_point_downward_only():
    wrong = []
    for module, targets in import_graph().items():
        layer = LAYERS.index(module.split(".")[0])
        wrong += [f"{module} imports {t}" for t in targets if LAYERS.index(t.split(".")[0]) < layer]
    assert not wrong, wrong


def test_there_is_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_graph_sees_a_cycle_and_a_wrong_direction(tmp_path, monkeypatch):
    """What the two checks above read: a planted cycle and an upward import are in the graph."""
    for folder in LAYERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "backends" / "b.py").write_text("from backends import c\n")
    (tmp_path / "backends" / "c.py").write_text("import backends.b\n")
    (tmp_path / "kernels" / "k.py").write_text("from webui.w import x\n")
    (tmp_path / "webui" / "w.py").write_text("import backends.b\nx = 1\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    graph = import_graph()
    assert graph["backends.b"] == {"backends.c"} and graph["backends.c"] == {"backends.b"}
    assert graph["kernels.k"] == {"webui.w"} and graph["webui.w"] == {"backends.b"}


def private_uses(path: Path, known: set[str]) -> list[str]:
    """Underscore names of the product that a file imports or reads off an imported product module."""
    tree = ast.parse(path.read_text())
    uses, aliases = [], {}
    for module, name, line in imports(path, known):
        if module.split(".")[0] not in PRODUCT:
            continue
        if name.startswith("_"):
            uses.append(f"{path.name}:{line} imports {module}.{name}")
        if module in known:
            aliases[module.rsplit(".", 1)[-1]] = module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in known and alias.asname:
                    aliases[alias.asname] = f"{node.module}.{alias.name}"
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
              and not node.attr.startswith("__") and node.value.id in aliases):
            uses.append(f"{path.name}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    return uses


def test_tests_and_benchmarks_use_public_names_only():
    known = product_modules()
    uses = [use for path in sources("tests", "benchmarks") for use in private_uses(path, known)]
    assert not uses, uses


def test_a_private_use_is_seen(tmp_path):
    planted = tmp_path / "t.py"
    planted.write_text("from kernels import q4_gemv\nfrom kernels.q4_gemv import _Args\nq4_gemv._Args\n")
    assert len(private_uses(planted, product_modules())) == 2
