"""ARCHITECTURE.md's import rules, held by the code: every import in the package (lazy ones inside
functions too) read with ast, relative imports resolved to package modules."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "segpcl_fast"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set:
    """The segpcl_fast modules and the top-level outside packages `path` imports, anywhere in it."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x`: module x
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            name_arg = node.args[0]  # importlib.import_module(f"segpcl_fast.kernels.{name}"): its fixed prefix
            if isinstance(name_arg, ast.JoinedStr) and isinstance(name_arg.values[0], ast.Constant):
                name_arg = name_arg.values[0]
            if isinstance(name_arg, ast.Constant) and isinstance(name_arg.value, str):
                found.add(name_arg.value.rstrip("."))
    return found


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _part(module: str) -> str:
    """segpcl_fast.method.losses -> method; segpcl_fast.config -> config."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _package_imports(module: str) -> set:
    return {_part(m) for m in GRAPH[module] if m.startswith("segpcl_fast.") and m.split(".")[1:2]}


def _importers_of(part: str) -> set:
    return {m for m, imported in GRAPH.items() if _part(m) != part and part in _package_imports(m)}


def test_the_graph_sees_lazy_and_relative_imports():
    assert "segpcl_fast.api" in GRAPH["segpcl_fast.cli"] or "api" in _package_imports("segpcl_fast.cli")
    assert "report" in _package_imports("segpcl_fast.api")  # ablate's lazy `from .report.results import ...`
    assert _importers_of("kernels")  # ops imports its kernels


def test_nothing_imports_analysis_but_the_cli():
    assert _importers_of("analysis") == {"segpcl_fast.cli"}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _part(m) == "kernels"))
def test_kernels_know_only_torch_and_triton(module):
    outside = {m.split(".")[0] for m in GRAPH[module]} - {"segpcl_fast", "torch", "triton", "__future__"}
    import sys
    assert not outside - set(sys.stdlib_module_names), module
    assert _package_imports(module) <= {"kernels"}, module


def test_method_calls_ops_never_a_kernel():
    assert not {m for m in GRAPH if _part(m) == "method" and ({"kernels", "_C"} & _package_imports(m))}


def test_model_knows_no_method_or_engine_and_data_no_model():
    for module in GRAPH:
        if _part(module) == "model":
            assert not {"method", "engine"} & _package_imports(module), module
        if _part(module) == "data":
            assert "model" not in _package_imports(module), module


def test_fileio_and_metrics_import_nothing_of_the_package_and_config_only_fileio():
    assert _package_imports("segpcl_fast.fileio") == set()
    assert _package_imports("segpcl_fast.metrics") == set()
    assert _package_imports("segpcl_fast.config") <= {"fileio", "data"}  # data: the lazy prompts import
    assert {m for m in GRAPH["segpcl_fast.config"] if m.startswith("segpcl_fast.data")} <= {
        "segpcl_fast.data.prompts", "segpcl_fast.data.prompts.resolve_templates"}


def test_only_the_cli_and_the_build_check_tool_print():
    """The rest of the package logs or returns values (a library's prints cannot be silenced)."""
    printing = set()
    for path in PACKAGE.rglob("*.py"):
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
        if any(isinstance(c.func, ast.Name) and c.func.id == "print" for c in calls):
            printing.add(_module_name(path))
    assert printing <= {"segpcl_fast.cli", "segpcl_fast.kernels.check_triton_build"}, printing
