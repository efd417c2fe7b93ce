"""Repository invariants that keep the product importable and honest."""
from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_mlflow_folder_does_not_shadow_the_library():
    assert not (ROOT / "mlflow" / "__init__.py").exists()
    assert not (ROOT / "mlflow.py").exists()
    # from the repo root (as pytest and `python -m` run), `import mlflow` must be the installed library
    out = subprocess.run([sys.executable, "-c", "import mlflow; print(mlflow.__file__, mlflow.__version__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "site-packages" in out


def test_trainer_never_imports_ray_or_mlflow():
    for path in (ROOT / "trainer").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(ray|mlflow)\b", text, re.M), path


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"^(bash scripts/install\.sh --test && ruff check \. && python -m pytest[^\n]*)$", readme, re.M)
    assert match, "README must show the test command, the lint first"
    assert match.group(1) in ci


def test_reading_a_spec_imports_no_torch_ray_or_mlflow():
    """--dry-run and every bad-spec message come back in under a second: the spec is plain Python."""
    code = ("import sys, sweeps.spec, sweeps.results.classify, trainer.curves; "
            "print(sorted({'torch', 'ray', 'mlflow', 'optuna'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_reading_a_sweep_folder_imports_no_ray_optuna_or_torch():
    """The report and export read finished sweeps: sweeps.results.collect and sweeps.results.records need only the files."""
    code = ("import sys, sweeps.results.collect, sweeps.results.records; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'ray', 'optuna', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_one_list_of_metric_names():
    from sweeps.launch import tracking
    from sweeps.results import collect, mlflow_records, records

    assert set(records.LOGGED_METRICS) | set(records.HISTORY_KEYS) | set(records.CURVES) <= set(records.METRICS)
    assert len(set(records.METRICS)) == len(records.METRICS)
    assert tracking.LOGGED_METRICS is records.LOGGED_METRICS and collect.HISTORY_KEYS is records.HISTORY_KEYS
    assert mlflow_records.CURVES is records.CURVES


SUBCOMMANDS = ("sweep", "train", "export", "report", "lr-find")


def test_the_finetune_command_lists_and_answers_each_subcommand(tmp_path):
    """[project.scripts] declares the one command, ``finetune``; its help lists every subcommand and each answers
    ``--help`` (exit 0).

    A venv installed by ``bash scripts/install.sh`` has it in its bin and it is run from there; a venv installed
    before the command (or from another checkout) runs it the way pip's launcher does.
    """
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(declared) == {"finetune"}
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}  # this checkout's packages
    installed = Path(sys.executable).parent / "finetune"
    module, func = declared["finetune"].split(":")
    launcher = [sys.executable, "-c", f"import sys; from {module} import {func}; sys.argv[0] = 'finetune'; sys.exit({func}())"]
    command = [str(installed)] if installed.exists() else launcher
    proc = subprocess.run([*command, "--help"], text=True, capture_output=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: finetune "), proc.stdout[:200]
    listed = re.findall(r"^    (\S+)\s", proc.stdout, re.M)
    assert listed == list(SUBCOMMANDS), proc.stdout
    for name in SUBCOMMANDS:
        proc = subprocess.run([*command, name, "--help"], text=True, capture_output=True, cwd=tmp_path, env=env)
        assert proc.returncode == 0, (name, proc.stderr)
        assert proc.stdout.startswith("usage: "), proc.stdout[:200]


def test_the_documented_file_commands_still_run():
    """``python sweeps/run.py`` and ``python sweeps/report.py`` from the repo root, as the README shows them."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    for script in ("sweeps/run.py", "sweeps/report.py"):
        proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: python {script} "), proc.stdout[:200]


def _package_files(*packages: str):
    return [p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))]


def _module_name(path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_no_package_sets_sys_path():
    for path in _package_files("sweeps", "trainer"):
        assert "sys.path" not in path.read_text(), path


def _project_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at any level (inside functions too): ``import a.b``,
    ``from a import b`` (a module or a name of one), ``from a.b import c`` and relative imports."""
    import ast

    modules = {_module_name(p): p for p in _package_files("sweeps", "trainer")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .x import y
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        packages = ("sweeps", "trainer", "sweeps.launch", "sweeps.results")  # their __init__ hold only a docstring
        graph[name] = {m for m in found if m in modules and m != name and m not in packages}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_packages_import_each_other_without_cycles():
    """Each module's project imports, deferred ones inside functions included, form no cycle: a module that two
    others need lives below both (``records``: the trial vocabulary; ``spec``: a space's own corners)."""
    graph = _project_imports()
    assert {"sweeps.spec", "sweeps.launch.space", "sweeps.report", "trainer.config"} <= set(graph)
    assert "sweeps.spec" in graph["sweeps.launch.space"], "the graph sees imports"
    assert "sweeps.results.html_report" in graph["sweeps.report"], "and the ones inside functions"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_reading_a_sweep_never_imports_running_one():
    """``sweeps.results`` (reading a finished sweep: records, classification, analysis, figures, report, export)
    imports nothing of ``sweeps.launch`` (running one: Ray, Optuna, the trial, pruning, tracking), deferred imports
    included; what both sides need lives above both (``sweeps.spec``, ``sweeps.faults``)."""
    graph = _project_imports()
    reading = [m for m in graph if m.startswith("sweeps.results.")]
    assert "sweeps.results.records" in reading and "sweeps.launch.finish" in graph
    crossing = [f"{m} -> {d}" for m in reading for d in sorted(graph[m]) if d.startswith("sweeps.launch")]
    assert not crossing, "the reading side imports the running side: " + "; ".join(crossing)


def test_the_sweeps_package_keeps_a_short_top():
    """The top of ``sweeps/`` holds the spec, the shared faults and the command-line entries; the rest is in
    ``launch/`` or ``results/``."""
    top = sorted(p.name for p in (ROOT / "sweeps").glob("*.py"))
    assert len(top) <= 8, top
    assert {"launch", "results"} <= {p.name for p in (ROOT / "sweeps").iterdir() if (p / "__init__.py").is_file()}


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_outcome_the_code_compares_with_is_an_outcome():
    """``Outcome`` (sweeps/results/records.py) is the one list of outcomes: a literal compared with ``.outcome`` anywhere in
    the packages (``r.outcome == "diverged"``, ``r.outcome not in ("failed", ...)``) must be one of its values."""
    import ast

    from sweeps.results.records import OUTCOMES

    def literals(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            for elt in node.elts:
                yield from literals(elt)

    seen, wrong = 0, []
    for path in [*_package_files("sweeps"), *(ROOT / "scripts").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            if not any(isinstance(s, ast.Attribute) and s.attr == "outcome" for s in sides):
                continue
            for side in sides:
                for value in literals(side):
                    seen += 1
                    if value not in OUTCOMES:
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {value!r}")
    assert seen > 10, "the test sees the comparisons"
    assert not wrong, "not an Outcome: " + "; ".join(wrong)
