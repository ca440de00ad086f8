"""The layout of the code (issue 16): imports among the project's modules run one way (no circle, imports inside
functions included), and no module is over 450 lines."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def imports(path):
    """The project modules `path` imports anywhere in it (top level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return {m for m in out if m in MODULES and m != path.stem}


def test_imports_run_one_way():
    graph = {m: imports(p) for m, p in MODULES.items()}
    order, state = [], {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import circle: " + " -> ".join(path + [m]))
        if state.get(m) != "done":
            state[m] = "open"
            for d in sorted(graph[m]):
                visit(d, path + [m])
            state[m] = "done"
            order.append(m)
    for m in sorted(graph):
        visit(m, [])
    assert order.index("data") < order.index("train") < order.index("detdiff")   # from the data up to the main job


def test_no_module_over_450_lines():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in sizes.items() if n > 450} == {}
