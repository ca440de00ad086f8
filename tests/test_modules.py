"""The layout of the code: imports among the project's modules run one way (no circle, and no project
import hidden inside a function), no module is over 450 lines, and README.md's table of files lists every module
below the ones it imports."""
import ast
import re
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


def test_no_project_import_inside_a_function():
    """An import of a project module inside a function would hide a circle instead of removing it."""
    hidden = []
    for m, p in MODULES.items():
        for fn in ast.walk(ast.parse(p.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                    hidden += [f"{m}.{fn.name} imports {n}" for n in names if n.split(".")[0] in MODULES]
    assert hidden == []


def test_the_readmes_table_of_files_lists_every_module_below_what_it_imports():
    """README.md's "The files" table names every module once, each after (or in the row of) the modules it imports."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| layer | file | what it holds |"):].split("\n\n")[0].splitlines()[2:]
    rows = [[name[:-3] for name in re.findall(r"`(\w+\.py)`", row.split("|")[2])] for row in table]
    listed = [m for row in rows for m in row]
    assert sorted(listed) == sorted(MODULES)
    row_of = {m: i for i, row in enumerate(rows) for m in row}
    late = [f"{m} imports {d}" for m in MODULES for d in imports(MODULES[m]) if row_of[d] > row_of[m]]
    assert late == []
