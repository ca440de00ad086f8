"""The notebooks run top to bottom, keep their outputs, and import the project instead of
re-implementing it.

Each notebook is executed from a copy (the file in notebooks/ is never written) with notebooks/ as
the working directory, as a reader running it in Jupyter would. Slow: together they take a few
minutes on 2 cores. """
import ast
import copy
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["01_ddpm_schedule", "02_layout_tokens", "03_perception_aware_attribute",
            "04_unet_and_perception_loss",
            "05_train_sample_evaluate", "06_the_trained_model"]


def project_functions():
    """Top-level function and class names of the product modules, which a notebook must import, not
    re-define."""
    names = set()
    for path in ROOT.glob("*.py"):
        tree = ast.parse(path.read_text())
        names |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return names


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_notebooks_exist_in_reading_order():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_keeps_outputs_and_imports_the_project(path):
    nb = nbformat.read(path, as_version=4)
    cells = code_cells(nb)
    assert cells and all(c.outputs for c in cells if "plt.show()" in c.source), \
        f"{path.name}: a plotting cell has no stored output (run the notebook and save it)"
    assert any(c.outputs for c in cells), f"{path.name}: no stored outputs"
    shadowed = set()
    for c in cells:
        tree = ast.parse("\n".join(l for l in c.source.splitlines() if not l.lstrip().startswith(("%", "!"))))
        shadowed |= {
            n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
        }
    assert not shadowed & project_functions(), f"{path.name} re-implements {sorted(shadowed & project_functions())}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    nb = nbformat.read(path, as_version=4)
    run = copy.deepcopy(nb)
    client = NotebookClient(run, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()                        # raises CellExecutionError naming the cell on any error
    errors = [o for c in code_cells(run) for o in c.outputs if o.output_type == "error"]
    assert not errors
