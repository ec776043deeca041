"""The `infra` marker is on exactly the tests that start real infrastructure (SLURM daemons, network
namespaces: the helpers in tests/infra other than faultinject), so plain `pytest` deselects all of them
(pyproject's addopts) and `pytest -m infra` runs all of them."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
INFRA_HELPERS = {"tests.infra.netns", "tests.infra.slurm_local", "tests.infra.slurm_netns"}


def imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def marks_infra(tree: ast.AST) -> bool:
    """Whether the module, a class or a test uses `pytest.mark.infra` anywhere."""
    return any(isinstance(n, ast.Attribute) and n.attr == "infra" and isinstance(n.value, ast.Attribute)
               and n.value.attr == "mark" for n in ast.walk(tree))


def module_level_infra(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                for t in node.targets):
            return marks_infra(node)
    return False


def test_infra_marker_is_on_exactly_the_tests_that_start_infrastructure():
    starts, marked = set(), set()
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        name = str(path.relative_to(TESTS))
        if imported_modules(tree) & INFRA_HELPERS:
            starts.add(name)
            assert module_level_infra(tree), f"{name} starts infrastructure: give it pytestmark = [pytest.mark.infra]"
        if marks_infra(tree):
            marked.add(name)
    assert starts == marked, f"marked infra without starting any: {sorted(marked - starts)}"
    assert starts == {"integration/test_netns_launch.py", "integration/test_slurm_local.py",
                      "integration/test_slurm_netns.py"}


def collected(*args: str) -> list[str]:
    """Test ids `pytest --collect-only` selects, with pyproject's addopts, from the infra files and test_hang."""
    import subprocess
    import sys

    files = ["tests/integration/test_netns_launch.py", "tests/integration/test_slurm_local.py",
             "tests/integration/test_slurm_netns.py", "tests/integration/test_hang.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             *args, *files], capture_output=True, text=True, cwd=TESTS.parent, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_plain_pytest_deselects_infra_and_dash_m_infra_selects_it():
    default, infra = collected(), collected("-m", "infra")
    assert default and all(t.startswith("tests/integration/test_hang.py::") for t in default)
    assert len(infra) == 6 and not any("test_hang" in t for t in infra)  # the command line's -m replaced addopts'
