"""The layout the README's "Files" and "Reading a diff" sections promise: module sizes, the share of
new lines each algorithm adds to grpo.py, and imports that go one way."""

import ast
import pathlib
import shutil
import subprocess

import pytest

import conftest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = [*conftest.SCRIPTS, "evaluate"]  # evaluate.py trains nothing, but is read as the others are
# Who may import whom among the shared modules (the scripts may import all of them).
ALLOWED = {
    "common": {"tasks", "plumbing", "fastgen"},
    "tasks": {"plumbing", "grading"},
    "grading": set(),
    "rundir": {"plumbing"},
    "fastgen": set(),
    "plumbing": set(),
}
TOOLS = {"bench", "results"}  # they run the scripts and may import anything; nothing imports them
MODULES = {p.stem for p in ROOT.glob("*.py")}  # every top-level module, found: a new one cannot escape the checks


def lines(name):
    return len((ROOT / f"{name}.py").read_text().splitlines())


def imported(name):
    """Every top-level module name `name`.py imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_module_sizes():
    assert lines("common") <= 600
    for name in ["tasks", "grading", "plumbing", "rundir", "fastgen"]:
        assert lines(name) <= 500, name
    for name in SCRIPTS:
        assert lines(name) <= 400, name


def test_every_top_level_module_has_a_place():
    """A new module at the top level is a script, a shared module or a tool: its place says what it may import
    and what may import it."""
    assert MODULES == set(SCRIPTS) | set(ALLOWED) | TOOLS, "place it in SCRIPTS, ALLOWED or TOOLS"


def test_imports_go_one_way():
    """Shared modules import only the shared modules ALLOWED says, scripts no script and no tool, and no module any
    tool; every module at the top level is checked, against every other (ours: all of them)."""
    ours = MODULES | set(SCRIPTS) | set(ALLOWED) | TOOLS
    for name in MODULES - TOOLS:
        found = imported(name) & ours
        assert not found & TOOLS, f"{name} imports {found & TOOLS}"
        if name in ALLOWED:
            assert found <= ALLOWED[name], f"{name} imports {found - ALLOWED[name]}"
        else:
            assert not found & set(SCRIPTS), f"{name} imports another script"


@pytest.mark.skipif(shutil.which("diff") is None, reason="needs diff(1)")
@pytest.mark.parametrize("script,share", [("cppo", 0.25), ("kdrl", 0.40), ("opd_plus", 0.40), ("dph_rl", 0.40)])
def test_diff_against_grpo_is_the_algorithm(script, share):
    out = subprocess.run(["diff", "grpo.py", f"{script}.py"], cwd=ROOT, capture_output=True, text=True).stdout
    new = sum(line.startswith(">") for line in out.splitlines())
    assert new <= share * lines(script), f"{new} new lines of {lines(script)}"


def test_no_source_line_over_127_characters():
    """Every script's first screen reads as CleanRL's do: the help strings are short phrases (docs/usage.md has the
    rest) and no line of any Python file here runs past 127 characters."""
    files = [p for p in ROOT.glob("**/*.py")  # ours: not a virtual environment (.ci-venv) nor a run's directory
             if not any(part.startswith(".") or part == "runs" for part in p.relative_to(ROOT).parts)]
    long = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if len(line) > 127]
    assert not long, long


@pytest.mark.skipif(shutil.which("diff") is None, reason="needs diff(1)")
def test_the_readme_diff_table_is_today_s():
    """README's "Reading a diff" table says how many lines each diff adds: the numbers are diff(1)'s now."""
    import re
    rows = re.findall(r"\| `diff (\w+)\.py (\w+)\.py` \| [^|]+ \| (\d+) of (\d+)", (ROOT / "README.md").read_text())
    assert len(rows) == len(conftest.SCRIPTS) - 1  # one row a script, grpo.py's own diff aside
    for a, b, new, of in rows:
        out = subprocess.run(["diff", f"{a}.py", f"{b}.py"], cwd=ROOT, capture_output=True, text=True).stdout
        assert (int(new), int(of)) == (sum(line.startswith(">") for line in out.splitlines()), lines(b)), (a, b)
