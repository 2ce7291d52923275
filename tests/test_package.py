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


#: each stage's rank along the pipeline: a module imports only from its own stage or a lower rank
STAGES = {
    "backbones": 0, "data": 1, "cache": 2, "extraction": 3, "train": 3, "runs": 4, "export": 5, "tools": 6,
    "cli": 7,
}  # fmt: skip


def test_imports_run_only_down_the_pipeline() -> None:
    """No stage imports a later one (cache never imports extraction, train never imports runs), also
    inside functions: the folder listing reads as the data path."""
    up = []
    for name, (path, tree) in _modules().items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in STAGES:
            continue
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                target = package[: len(package) - (node.level - 1)] + (node.module or "").split(".")
                stage = target[1] if len(target) > 1 else None
                if stage in STAGES and STAGES[stage] > STAGES[parts[1]]:
                    up.append(f"{name}:{node.lineno} imports {'.'.join(target)}")
    assert up == []


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
