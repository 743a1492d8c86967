"""The architecture's rules, checked (docs/design.md §0): a newcomer can rely on them."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "corpusgen"
MAX_FUNCTION_LINES = 80


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_environment_is_read_in_one_module():
    """Engine behaviour is configuration (policy fields the planner counts); what comes from the
    environment is read in corpusgen/envs.py alone, so a reader finds every switch in one place."""
    for path in _modules():
        if path.name == "envs.py":
            continue
        text = path.read_text()
        assert "os.environ" not in text and "os.getenv" not in text, f"{path}: read the environment in envs.py"


def test_production_code_never_loads_a_test_double():
    """Test doubles are passed in by tests (tests/fake_cli.py, run_job(engine_factory=…)), never
    found by production code."""
    doubles = ("tests", "fake_engine", "fake_cli", "conftest")
    for path in _modules():
        text = path.read_text()
        assert "CORPUSGEN_FAKE" not in text and "spec_from_file_location" not in text, path
        for node in ast.walk(ast.parse(text)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in doubles for n in names), f"{path}:{node.lineno} imports a test double"


def test_planner_and_job_layer_do_not_import_torch():
    """The planner and the job layer are torch-free at import: `plan`, the memory check and a job's
    input checks run before the engine (and CUDA) loads, and the job layer reaches the engine only
    through the Generator protocol of engine/api.py."""
    code = ("import sys\n"
            "import corpusgen.planner.policy, corpusgen.planner.memory, corpusgen.planner.cost_model\n"
            "import corpusgen.planner.optimizer, corpusgen.planner.hardware, corpusgen.planner.plan\n"
            "import corpusgen.job.runner, corpusgen.job.spec, corpusgen.job.manifest, corpusgen.engine.api\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('corpusgen.engine.')\n"
            "             and m not in ('corpusgen.engine.api', 'corpusgen.engine.config', 'corpusgen.engine.shapes'))\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_functions_are_short():
    """No function over 80 lines: a reader holds one in their head (STYLE.md). A Triton kernel is
    one GPU program, read as one, and is exempt."""
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_modules_are_short_or_say_why():
    """A module over 400 lines says in its docstring why it is one module ("Longer than 400 lines:
    …"), so a reader knows the size is a decision, not drift."""
    long = []
    for path in _modules():
        text = path.read_text()
        if text.count("\n") > 400 and "Longer than 400 lines:" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{path.relative_to(REPO)} ({text.count(chr(10))} lines)")
    assert not long, long
