"""The engine's shape: layers that import only downwards, no import cycles, old import paths for one release,
and a Slicer install list that is exactly what the module runs."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from test_packaging import MODULE_DIR, cmake_list

LIB = MODULE_DIR / "AutoDDPMLib"
# Lowest first; a module may import from its own layer or a lower one (AutoDDPMLib/__init__.py says why).
LAYERS = [
    {"errors", "resources", "provenance", "legacy_paths", "cpu_sharing", "__init__"},
    {"diffusion"},
    {"volumes"},
    {"models"},
    {"detection"},
    {"training"},
    {"benchmark"},
    {"slicer_bridge", "cohort", "progress", "cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(MODULE_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(LIB.rglob("*.py")) if "__pycache__" not in path.parts}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The engine modules a file imports anywhere in it (function-level imports too)."""
    name = module_name(path) if path.is_relative_to(LIB) else ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules}
    return found - {name}


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return next(index for index, names in enumerate(LAYERS) if part in names)


def test_every_engine_module_belongs_to_a_layer() -> None:
    for module in engine_modules():
        layer(module)  # raises StopIteration for a package the layer list does not know


def test_no_module_imports_from_a_higher_layer() -> None:
    modules = engine_modules()
    upward = [f"{module} imports {target}" for module, path in modules.items()
              for target in sorted(imported_modules(path, modules)) if layer(target) > layer(module)]
    assert upward == []


def test_no_import_cycles() -> None:
    modules = engine_modules()
    graph = {module: imported_modules(path, modules) for module, path in modules.items()}
    # A package's __init__ is imported with each of its modules, so an edge into a package is not a cycle of its own.
    graph = {module: {t for t in targets if not module.startswith(t + ".")} for module, targets in graph.items()}
    done, on_path = set(), []

    def visit(module: str) -> None:
        if module in on_path:
            pytest.fail("import cycle: " + " -> ".join(on_path[on_path.index(module):] + [module]))
        if module in done:
            return
        on_path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        on_path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_old_flat_import_paths_still_work_with_a_warning() -> None:
    from AutoDDPMLib.detection.inference import AutoDDPM
    from AutoDDPMLib.legacy_paths import MOVED

    with pytest.warns(DeprecationWarning, match="AutoDDPMLib.inference moved to AutoDDPMLib.detection.inference"):
        from AutoDDPMLib.inference import AutoDDPM as old
    assert old is AutoDDPM
    with pytest.warns(DeprecationWarning, match="moved to AutoDDPMLib.benchmark.runner.run_benchmark"):
        from AutoDDPMLib.benchmark import run_benchmark
    from AutoDDPMLib.benchmark.runner import run_benchmark as new
    assert run_benchmark is new
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for old_name, new_name in MOVED.items():
            assert (LIB / (new_name.replace(".", "/") + ".py")).is_file(), new_name
            assert __import__(f"AutoDDPMLib.{old_name}", fromlist=["_"]).__name__ == f"AutoDDPMLib.{new_name}"
    with pytest.raises(ModuleNotFoundError):
        import AutoDDPMLib.no_such_module  # noqa: F401


def modules_a_run_loads(model: Path, volume: Path, output_dir: Path) -> set[str]:
    """The engine modules that `python -m AutoDDPMLib.cli run`, the command the Slicer module launches, imports
    where the benchmark and training subpackages are not installed (as in the Slicer extension)."""
    script = ("import atexit, json, runpy, sys\n"
              "sys.modules.update({'AutoDDPMLib.benchmark': None, 'AutoDDPMLib.training': None})\n"
              "atexit.register(lambda: print('MODULES', json.dumps(sorted(m for m, module in sys.modules.items() if m.startswith('AutoDDPMLib') and module))))\n"
              f"sys.argv = ['autoddpm', 'run', {str(volume)!r}, '--model', {str(model)!r}, '--output-dir', {str(output_dir)!r},"
              " '--progress', 'none']\n"
              "runpy.run_module('AutoDDPMLib.cli', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.rsplit("MODULES", 1)[1]))


def test_slicer_installs_exactly_what_the_module_runs(tiny_model, head_volume, tmp_path) -> None:
    modules = engine_modules()
    needed = modules_a_run_loads(tiny_model, head_volume, tmp_path / "out") | {"AutoDDPMLib.cli"}  # it ran as __main__
    # What AutoDDPM.py imports, and what those import in turn (read from the source: it needs Slicer to run).
    pending = imported_modules(MODULE_DIR / "AutoDDPM.py", modules)
    while pending:
        module = pending.pop()
        if module not in needed:
            needed.add(module)
            pending |= imported_modules(modules[module], modules)
    needed |= {module.rsplit(".", 1)[0] for module in needed if module.count(".") > 1}  # their packages' __init__
    expected = {"AutoDDPM.py"} | {str(modules[module].relative_to(MODULE_DIR)) for module in needed}
    listed = set(cmake_list((MODULE_DIR / "CMakeLists.txt").read_text(), "MODULE_PYTHON_SCRIPTS"))
    assert sorted(expected - listed) == [], "the module runs these: add them to MODULE_PYTHON_SCRIPTS in AutoDDPM/CMakeLists.txt"
    assert sorted(listed - expected) == [], "the module never runs these: remove them from MODULE_PYTHON_SCRIPTS"
    assert not any(name.startswith(("AutoDDPMLib/benchmark/", "AutoDDPMLib/training/")) for name in listed)
