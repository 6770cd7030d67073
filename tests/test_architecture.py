"""The package's structure: the library never imports the application, no import cycle (lazy imports included),
the public API loads no optional or application dependency and changes no global state, the wheel holds `codeq`."""
import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "codeq"
# The library core: what a user's own training loop needs. It may import nothing outside itself.
CORE = ("codeq.errors", "codeq.registry", "codeq.io", "codeq.quantizers", "codeq.attach", "codeq.optim",
        "codeq.regularizers", "codeq.channels", "codeq.compression", "codeq.convert", "codeq.export", "codeq.bn",
        "codeq.budget")
# Built on the core, beside it: models, data sets, the training loop. They may not import the application.
ENGINE = ("codeq.models", "codeq.data", "codeq.training")
APPLICATION = ("codeq.app",)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every codeq module ``path`` imports, at module level or inside functions (lazy imports are edges too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "codeq"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "codeq":
            for alias in node.names:  # `from codeq.x import y` names module codeq.x.y when y is a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path) for name, path in MODULES.items()}


def layer(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_the_layers_are_complete():
    """Every module belongs to exactly one layer (a new sub-package must be placed)."""
    unplaced = [name for name in MODULES if name not in ("codeq", "codeq.__main__")
                and sum(layer(name, group) for group in (CORE, ENGINE, APPLICATION)) != 1]
    assert not unplaced


@pytest.mark.parametrize(("lower", "forbidden"), [(CORE, ENGINE + APPLICATION), (ENGINE, APPLICATION)])
def test_imports_point_down_only(lower, forbidden):
    wrong = sorted((name, target) for name, targets in GRAPH.items() if layer(name, lower)
                   for target in targets if layer(target, forbidden))
    assert not wrong, f"the library imports what sits above it: {wrong}"


def test_no_import_cycle():
    """Depth-first search for a back edge; the cycle found is printed whole."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH.get(name, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_lazy_imports_and_cycles():
    """The graph holds imports made inside functions (export_onnx's), so a lazy cycle would be found."""
    assert "codeq.export.onnx" in GRAPH["codeq"]
    assert "codeq.quantizers._percentile_kernels" in GRAPH["codeq.quantizers.percentile"]


def test_importing_codeq_loads_no_optional_or_application_dependency():
    code = """
import atexit, logging, signal, sys
import torch  # codeq's one required import; what torch itself registers is not codeq's
handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
registered = atexit._ncallbacks()
root = list(logging.getLogger().handlers)
import codeq
heavy = {"pydantic", "yaml", "wandb", "onnx", "onnxruntime", "timm", "numba", "matplotlib", "sklearn"}
loaded = sorted(heavy & {name.split(".")[0] for name in sys.modules})
assert not loaded, loaded
assert not [name for name in sys.modules if name.startswith("codeq.app")]
assert {number: signal.getsignal(number) for number in handlers} == handlers
assert atexit._ncallbacks() == registered, "an atexit hook"
assert logging.getLogger().handlers == root
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_the_wheel_holds_codeq_alone_with_its_command(tmp_path):
    """A wheel built from the checkout installs the package `codeq` (no `src`, none of the seed's modules) and the
    `codeq` console script; installed on its own, it imports and runs from anywhere."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("codeq_train-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"codeq"}
    assert "codeq/app/cli.py" in names and "codeq/quantizers/deadzone.py" in names
    entry_points = archive.read(next(name for name in names if name.endswith("entry_points.txt"))).decode()
    assert "codeq = codeq.app.cli:main" in entry_points
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True)
    code = "import codeq, codeq.app.cli; print(codeq.__file__)"
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    shown = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith(str(target)), shown.stderr
