"""The architecture, checked from the source: layers point down, DVC sees every module a stage runs.

Layers (top imports bottom, never the reverse): the app (`tagtune/app/`: CLI, chat, UI) ← flows/
(Prefect orchestration) ← stages/ (one module per stage + the STAGES table in stages/__init__.py) ←
the library (the rest of `tagtune/`). Imports are read with `ast`, so a lazy import inside a function
counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
import yaml

import stages

REPO = Path(__file__).resolve().parents[1]
LIBRARY_ONLY_MLFLOW = {"tagtune/tracking.py", "tagtune/registry.py", "tagtune/pyfunc.py"}


def _imports(path: Path) -> set[str]:
    """Every absolute module name `path` imports (`from a.b import c` gives a.b and a.b.c)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def _module_file(name: str) -> Path | None:
    path = REPO / (name.replace(".", "/") + ".py")
    return path if path.is_file() else None


def _layer(module: str) -> str | None:
    if module == "tagtune.app" or module.startswith("tagtune.app."):
        return "app"
    top = module.split(".")[0]
    return {"tagtune": "library", "stages": "stages", "flows": "flows"}.get(top)


def _sources(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


# which layers each layer may import
ALLOWED = {
    "library": {"library"},
    "stages": {"library", "stages"},  # `stages` itself only for the table; a stage never imports another
    "flows": {"library", "stages", "flows"},
    "app": {"library", "stages", "flows", "app"},
}


def layer_violations(files: list[tuple[Path, str]] | None = None) -> list[str]:
    """`file: imports X (layer → layer)` for each import that points up, and each stage→stage import.

    `files`: (path, module name) pairs; default every module of tagtune/, stages/ and flows/.
    """
    if files is None:
        paths = [*_sources("tagtune"), *_sources("stages"), *_sources("flows")]
        files = [(p, _module_name(p)) for p in paths]
    stage_modules = {f"stages.{p.stem}" for p in _sources("stages") if p.stem != "__init__"}
    bad = []
    for path, me in files:
        mine = _layer(me)
        for imported in sorted(_imports(path)):
            theirs = _layer(imported)
            if theirs is None:
                continue
            if theirs not in ALLOWED[mine]:
                bad.append(f"{path.name}: imports {imported} ({mine} → {theirs})")
            elif mine == "stages" and me != "stages" and imported in stage_modules and imported != me:
                bad.append(f"{path.name}: imports {imported} (one stage importing another)")
    return bad


def test_layers_point_down_and_no_stage_imports_another():
    assert layer_violations() == []


def test_the_layer_check_catches_upward_and_sideways_imports(tmp_path):
    """The check above can fail: each kind of bad import is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from tagtune.app.cli import app\n    import stages.split\n    import flows.pipeline\n"
    )
    assert layer_violations([(probe, "tagtune.probe")]) == [
        "probe.py: imports flows.pipeline (library → flows)",
        "probe.py: imports stages.split (library → stages)",
        "probe.py: imports tagtune.app.cli (library → app)",
        "probe.py: imports tagtune.app.cli.app (library → app)",
    ]
    assert layer_violations([(probe, "stages.probe")]) == [
        "probe.py: imports flows.pipeline (stages → flows)",
        "probe.py: imports stages.split (one stage importing another)",
        "probe.py: imports tagtune.app.cli (stages → app)",
        "probe.py: imports tagtune.app.cli.app (stages → app)",
    ]
    assert layer_violations([(probe, "flows.probe")]) == [
        "probe.py: imports tagtune.app.cli (flows → app)",
        "probe.py: imports tagtune.app.cli.app (flows → app)",
    ]


def project_modules(module: str) -> set[str]:
    """`module` and every tagtune library module it imports, transitively, as repo-relative files."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or name in seen:
            continue
        seen.add(name)
        todo += [m for m in _imports(path) if _layer(m) == "library"]
    return {_module_file(m).relative_to(REPO).as_posix() for m in seen if _module_file(m) is not None}


@pytest.mark.parametrize("name", list(stages.STAGES))
def test_dvc_yaml_lists_every_module_a_stage_runs(name):
    """A change to any module a stage imports makes DVC re-run that stage (no stale results)."""
    deps = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]["deps"])
    needed = project_modules(f"stages.{name}") - {"tagtune/__init__.py"}
    assert needed - deps == set(), f"dvc.yaml stage {name} misses deps {sorted(needed - deps)}"
    listed = {d for d in deps if d.endswith(".py")}
    assert listed - needed == set(), f"dvc.yaml stage {name} lists modules it never imports"


@pytest.mark.integration
def test_a_change_to_text_py_makes_dvc_rerun_format_and_split(tmp_path, tiny_llama):
    from flowrepo import env, make_workspace

    root = make_workspace(tmp_path / "ws", tiny_llama)

    def dvc(*args: str) -> str:
        r = subprocess.run(
            ["dvc", *args], cwd=root, env=env(root), capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r.stdout

    dvc("repro", "split")
    assert "changed" not in dvc("status", "ingest", "format", "split")
    with open(root / "tagtune" / "text.py", "a", encoding="utf-8") as f:
        f.write("\n# a change in how text is normalised\n")
    status = dvc("status", "ingest", "format", "split")
    assert "format:" in status and "split:" in status and "ingest:" not in status, status


def test_only_the_tracking_registry_and_pyfunc_modules_import_mlflow():
    found = set()
    for path in [*_sources("tagtune"), *_sources("stages"), *_sources("flows")]:
        if any(m == "mlflow" or m.startswith("mlflow.") for m in _imports(path)):
            found.add(path.relative_to(REPO).as_posix())
    assert found <= LIBRARY_ONLY_MLFLOW, sorted(found - LIBRARY_ONLY_MLFLOW)


def test_no_function_over_80_lines_in_the_library_and_stages():
    long = []
    for path in [*_sources("tagtune"), *_sources("stages")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []
