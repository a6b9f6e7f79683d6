"""The house rules, checked: small pieces, imports one way, one of each helper, a README that fits a screen."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import experiment as ex
from data import prepare_common as pc

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for p in ROOT.rglob("*.py")
                 if not {"tests", ".venv", ".ci-venv"} & set(p.relative_to(ROOT).parts))
ENTRY_POINTS = ("experiment", "model", "train_agent", "sweep", "prune", "sample", "plot", "bench")


def definitions(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node, node.end_lineno - node.lineno + 1


def imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_no_function_over_60_lines_and_no_class_over_250_outside_tests():
    too_long = [f"{p.relative_to(ROOT)}:{node.name} {n} lines" for p in SOURCES for node, n in definitions(p)
                if n > (250 if isinstance(node, ast.ClassDef) else 60)]
    assert not too_long


def test_experiment_py_is_a_file_an_idea_can_hold_in_view():
    assert len((ROOT / "experiment.py").read_text().splitlines()) <= 1800


@pytest.mark.parametrize("module", sorted((ROOT / "harness").glob("*.py")), ids=lambda p: p.name)
def test_the_package_never_imports_experiment_py_or_an_entry_point(module):
    assert module.read_text().startswith('"""'), f"{module.name} says what it is for in a docstring"
    assert not [m for m in imported_modules(module) if m.split(".")[0] in ENTRY_POINTS]


def test_prepare_common_is_one_module_so_its_errors_are_one_class():
    # Loaded under several names, the same error would be distinct classes and an except clause would miss it.
    assert ex.prepare_common is pc and sys.modules["data.prepare_common"] is pc
    with pytest.raises(pc.PrepareError):
        ex.prepare_common.get_spec("no_such_dataset")
    names = [name for name, module in sys.modules.items() if getattr(module, "__file__", None)
             and module.__file__.endswith("prepare_common.py")]
    assert names == ["data.prepare_common"]


def test_plot_py_and_the_file_helpers_import_no_torch():
    code = "import sys, plot, harness.files, harness.stats; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_plot_py_stays_free_of_torch():
    reachable, todo = set(), ["plot"]
    while todo:  # plot.py and every module of the project it imports, transitively
        name = todo.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if name in reachable or not path.exists():
            continue
        reachable.add(name)
        modules = list(imported_modules(path))
        assert not [m for m in modules if m.split(".")[0] == "torch"], name
        todo += modules


@pytest.mark.parametrize("definition", ["def atomic_write", "def sha256_file", "def holm", "def paired_",
                                        "def mean_and_stderr", "def read_json"])
def test_one_of_each_helper(definition):
    defining = [p.relative_to(ROOT) for p in SOURCES if re.search(rf"^\s*{definition}", p.read_text(), re.M)]
    assert len(defining) == 1, defining  # (the atomic writers all live in harness/files.py)


def test_the_readme_fits_a_screen_and_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15_000
    commands = readme.split("```")[1].strip().splitlines()
    assert commands[0] == "bash" and len(commands) == 3
    assert "python experiment.py" in commands[1] and "pytest" in commands[2]


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a markdown page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_docs_index_links_every_page_and_every_link_resolves():
    index = (ROOT / "docs" / "README.md").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert not [page for page in pages if f"({page}" not in index]
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", page.read_text()):
            if target.startswith("http"):
                continue
            linked = page.parent / target if target else page
            assert linked.exists(), f"{page.name} links a missing {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in heading_anchors(linked), f"{page.name} links a missing heading {target}#{anchor}"
