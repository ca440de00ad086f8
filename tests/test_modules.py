"""The layout of the code. The method (the top-level modules but the main job's entry, detdiff.py)
imports only itself, so that `import train` loads nothing of the tooling one folder down
(data_sets/, perceptive/, experiments/, tools/); imports among all modules run one way (no circle,
and no project import hidden inside a function); one training step reads four files at most; and
README.md's table of files lists every module below the ones it imports. A method file run as a
script may hand its command line to the tooling in its `if __name__ == "__main__"` block (sample.py
does: writing data sets is tooling); importing the module never runs that block."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("data_sets", "perceptive", "experiments", "tools")
ENTRY = "detdiff"                       # the main job: top level, and free to import the tooling
MODULES = {p.stem: p for p in ROOT.glob("*.py")}
MODULES.update({f"{pkg}.{p.stem}": p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")
                if p.stem != "__init__"})
METHOD = {m for m in MODULES if "." not in m and m != ENTRY}


def is_main_block(node):
    """`if __name__ == "__main__":` at module level."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
        getattr(node.test.left, "id", None) == "__name__"


def imports(name, main_block=True):
    """The project modules module `name` imports anywhere in it (top level or inside a function);
    without its `if __name__ == "__main__"` block when main_block is False."""
    tree = ast.parse(MODULES[name].read_text())
    body = [n for n in tree.body if main_block or not is_main_block(n)]
    out = set()
    for node in (x for top in body for x in ast.walk(top)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}          # from pkg import module
    return {m for m in out if m in MODULES and m != name}


def test_the_method_imports_only_the_method():
    outside = {m: sorted(imports(m, main_block=False) - METHOD) for m in METHOD}
    assert {m: d for m, d in outside.items() if d} == {}


def test_importing_train_or_sample_loads_only_method_modules():
    """What a reader of the method imports: nothing of the tooling comes along (checked in a fresh
    interpreter)."""
    code = "import sys, train, sample; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    project = {m for m in loaded.stdout.split() if m.split(".")[0] in METHOD | set(PACKAGES) | {ENTRY}}
    assert project <= METHOD and {"train", "sample", "unet", "diffusion", "perception",
                                  "data"} <= project


def test_imports_run_one_way():
    graph = {m: imports(m) for m in MODULES}
    order, state = [], {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import circle: " + " -> ".join(path + [m]))
        if state.get(m) != "done":
            state[m] = "open"
            # sample's main block
            for d in sorted(graph[m] - ({"data_sets.export"} if m == "sample" else set())):
                visit(d, path + [m])
            state[m] = "done"
            order.append(m)
    for m in sorted(graph):
        visit(m, [])
    # from the data up to the main job
    assert order.index("data") < order.index("train") < order.index(ENTRY)


def test_no_project_import_inside_a_function():
    """An import of a project module inside a function would hide a circle instead of removing
    it."""
    hidden = []
    for m, p in MODULES.items():
        for fn in ast.walk(ast.parse(p.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                    hidden += [f"{m}.{fn.name} imports {n}" for n in names
                               if n.split(".")[0] in METHOD | set(PACKAGES) | {ENTRY}]
    assert hidden == []


def test_one_training_step_reads_four_files_at_most():
    """train.train_step and what it calls: the modules its body names (diffusion, perception, ...),
    the UNet's module (the forward, the perception head inside it) and train.py itself."""
    tree = ast.parse(MODULES["train"].read_text())
    step = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_step")
    named = {
        n.value.id
        for n in ast.walk(step)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
    }
    files = (named & METHOD) | {"train", "unet"}
    assert files == {"train", "diffusion", "unet", "perception"}


def test_the_readmes_table_of_files_lists_every_module_below_what_it_imports():
    """README.md's "The files" table names every module once (`data.py`, `perceptive/detector.py`),
    each after (or in the row of) the modules it imports."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| layer | file | what it holds |"):].split("\n\n")[0].splitlines()[2:]
    rows = [[p[:-3].replace("/", ".") for p in re.findall(r"`([\w/]+\.py)`", row.split("|")[2])] for row in table]
    listed = [m for row in rows for m in row]
    assert sorted(listed) == sorted(MODULES)
    row_of = {m: i for i, row in enumerate(rows) for m in row}
    late = [f"{m} imports {d}" for m in MODULES for d in imports(m, main_block=False) if row_of[d] > row_of[m]]
    assert late == []
