"""README.md and docs/*.md: every relative link and image resolves (the file exists, and a #heading
exists in the page it points to), and no page names an issue of the tracker (a reader has none). Every
reference in the code, the notebooks and the pages resolves: docs/paper.md sections and equations, page
anchors, files and functions."""
import importlib
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (not - and _), spaces as
    hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)   # no headings inside code blocks
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_the_reference_slug_matches_githubs_for_a_heading_with_code_and_punctuation():
    assert slug("Latent mode (`--space latent`, 64 px and up)") == "latent-mode---space-latent-64-px-and-up"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_and_image_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):                         # http(s), mailto: not checked here
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file "
                          f"{dest.relative_to(ROOT) if ROOT in dest.parents else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert broken == [], f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_no_issue_numbers(page):
    assert re.findall(r"[Ii]ssues? \d+", page.read_text()) == []


# ----------------------------------------------------------------------------------------------------------------
# References in code, notebooks and docs: every docs/paper.md section and equation, page anchor, file and
# `module.function` that a docstring, comment, notebook or page cites exists in the repository.

PACKAGES = ("data_sets", "perceptive", "experiments", "tools")
METHOD = ("config", "data", "diffusion", "unet", "perception", "optim", "autoencoder", "train", "sample", "detdiff")
SOURCES = sorted(set(ROOT.glob("*.py")) | {p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")}
                 | set((ROOT / "tests").glob("*.py")) | set((ROOT / "notebooks").glob("*.ipynb"))) + PAGES
FOREIGN = {"setup.py", "model.py", "superminddpm.py", "engine.py", "test_engine.py", "sample_ddp.py",   # others'
           "__init__.py"}                                         # and the package a test writes


def texts(prose_only=False):
    """(name, text) of every source, notebook and page; a notebook's cells joined. prose_only: of a Python file
    or a notebook's code only its comments and strings (code names a local variable `train` as freely as a
    module), with a notebook's markdown."""
    for p in SOURCES:
        if p.suffix == ".md":
            yield p.relative_to(ROOT), p.read_text()
            continue
        cells = [dict(cell_type="code", source=p.read_text())] if p.suffix == ".py" else \
            [dict(c, source="".join(c["source"])) for c in json.loads(p.read_text())["cells"]]
        parts = []
        for c in cells:
            if c["cell_type"] != "code" or not prose_only:
                parts.append(c["source"])
                continue
            code = "\n".join(l for l in c["source"].splitlines() if not l.lstrip().startswith(("%", "!")))
            parts += [t.string for t in tokenize.generate_tokens(io.StringIO(code).readline)
                      if t.type in (tokenize.COMMENT, tokenize.STRING)]
        yield p.relative_to(ROOT), "\n".join(parts)


def paper_sections_and_equations():
    text = (ROOT / "docs" / "paper.md").read_text()
    sections = {int(m) for m in re.findall(r"^## (\d+)\.", text, flags=re.M)}
    equations = {int(m) for m in re.findall(r"\(Eq\. (\d+)\)", text)}
    return sections, equations


def test_every_paper_section_and_equation_cited_exists():
    sections, equations = paper_sections_and_equations()
    assert sections == {1, 2, 3, 4, 5, 6} and equations == set(range(1, 12))
    bad = []
    for name, text in texts():
        for m in re.finditer(r"docs/paper\.md,? (?:sections? |s\.)(\d+)(?:(?:-|, | and )(\d+))?", text):
            bad += [f"{name}: {m.group(0)}" for n in m.groups() if n and int(n) not in sections]
        for m in re.finditer(r"docs/paper\.md,? Eqs?\. (\d+)(?:-(\d+))?", text):
            bad += [f"{name}: {m.group(0)}" for n in m.groups() if n and int(n) not in equations]
    assert bad == []


def test_no_reference_to_a_page_outside_the_repository():
    bad = [f"{name}: {m}" for name, text in texts() for m in re.findall(r"\bPAPER\.md\b|\bSTYLE(?:\.md| \d)", text)]
    assert bad == []


def test_every_page_anchor_cited_in_code_and_notebooks_exists():
    bad = []
    for name, text in texts():
        for page, anchor in re.findall(r"((?:docs/)?[\w]+\.md)#([\w-]+)", text):
            dest = ROOT / page if page.startswith("docs/") or page == "README.md" else ROOT / "docs" / page
            if dest.is_file() and anchor not in anchors(dest):
                bad.append(f"{name}: {page}#{anchor}")
    assert bad == []


def test_every_python_file_cited_exists():
    """`train.py`, `experiments/evaluate.py`, tests/test_data.py: a path from the repository's root, or a file
    beside the one that names it (a package's own files in its docstring)."""
    bad = []
    for name, text in texts(prose_only=True):
        for ref in set(re.findall(r"(?<![\w./\\-])((?:[\w-]+/)*[\w-]+\.py)\b", text)):
            here = (ROOT / name).parent
            if ref not in FOREIGN and not (ROOT / ref).is_file() and not (here / ref).is_file():
                bad.append(f"{name}: {ref}")
    assert bad == []


def resolves(dotted):
    """module.name[.attr] of the project -> True when the module has that attribute."""
    parts = dotted.split(".")
    for k in (2, 1):                                  # perceptive.attributes.make_attributes, then data.box_pixels
        mod = ".".join(parts[:k])
        if (k == 2 and parts[0] in PACKAGES) or (k == 1 and parts[0] in METHOD):
            try:
                obj = importlib.import_module(mod)
            except ImportError:
                return False
            for attr in parts[k:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
    return True


def test_every_function_cited_exists():
    """`sample.guided_eps`, `perceptive.attributes.make_attributes`, diffusion.Diffusion.q_sample: each cited name
    of a project module is there (a file name such as data.py is not a citation)."""
    mods = "|".join(METHOD + tuple(rf"{p}\.\w+" for p in PACKAGES))
    cite = re.compile(rf"(?<![\w./\\-])((?:{mods})\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
    skip = re.compile(r"\.(py|md|json|png|pt|txt|ipynb|yaml|jpg)$")
    bad = []
    for name, text in texts(prose_only=True):
        for ref in set(cite.findall(text)):
            if not skip.search(ref) and not resolves(ref):
                bad.append(f"{name}: {ref}")
    assert sorted(bad) == []
