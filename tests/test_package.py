"""The package's shape: stage subpackages without import cycles, short functions, small job APIs, one
writer of a run's config.json."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import featcache
from featcache.runs import finetune_run, probe_run, sweep_run, train_run

ROOT = Path(featcache.__file__).parent


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = (path, ast.parse(path.read_text()))
    return out


def _imports(name: str, path: Path, tree: ast.Module, modules: set[str]) -> set[str]:
    """The package modules ``name`` imports at module level (relative imports, resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            subs = {f"{target}.{a.name}" for a in node.names} & modules
            out |= subs or ({target} & modules)
    return out - {name}


def test_no_import_cycles_between_modules() -> None:
    modules = _modules()
    graph = {m: _imports(m, p, t, set(modules)) for m, (p, t) in modules.items()}
    cycles, state = [], {}

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in graph[u]:
            # a submodule importing its own package's __init__ is how Python loads packages, not a cycle
            if state.get(v) == 1 and not u.startswith(v + "."):
                cycles.append([*stack[stack.index(v) :], v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    assert cycles == []


def test_no_function_is_longer_than_100_lines() -> None:
    long = [
        f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, (_, tree) in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100
    ]
    assert long == []


def test_every_job_takes_a_run_spec_and_few_arguments() -> None:
    for job in (train_run, finetune_run, sweep_run, probe_run):
        params = list(inspect.signature(job).parameters)
        assert params[0] == "spec" and len(params) <= 5, (job.__name__, params)


def test_config_json_is_written_in_exactly_one_function() -> None:
    """Only RunFolder.write_config names the file it writes (readers go through RunFolder too)."""
    places = [
        f"{name}:{node.lineno}"
        for name, (_, tree) in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value == "config.json"
    ]
    assert places and all(p.startswith("featcache.runs.folder:") for p in places), places
    source = (ROOT / "runs" / "folder.py").read_text()
    assert len(re.findall(r'write_json\(.*"config\.json"', source)) == 1
