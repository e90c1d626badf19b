"""The package's layering: who may import whom, no private names across modules, no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dag_jax"

# layer -> the project's layers it may import (besides itself); data flows one way
ALLOWED = {
    "models": set(),
    "diffusion": set(),
    "weights": {"models"},
    "algos": {"diffusion"},
    "rewards": {"models", "weights", "tinyworld"},
    "data": {"tinyworld"},
    "pipeline": {"models", "weights", "tinyworld"},
    "configs": set(),
    "infra": set(),
}
RUNTIME = ("train", "eval", "export", "sample", "pipeline", "models", "weights", "diffusion")


def module_name(path: Path) -> str:
    """Return the dotted module name of a file of the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[str, str | None]]:
    """Return (module, imported name or None) of every dag_jax import in a file, lazy ones too
    (those only for type checkers, under ``if TYPE_CHECKING:``, left out)."""
    out = []
    for node in walk_runtime(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.startswith("dag_jax")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dag_jax"):
            out += [(node.module, a.name) for a in node.names]
    return out


def walk_runtime(tree: ast.AST):
    """Yield the nodes of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
                continue
            todo.append(child)


def layer(module: str) -> str:
    """Return the layer of a dotted module name (its first part below dag_jax)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_layers_below_it_and_no_private_names(path):
    own = layer(module_name(path))
    for module, name in project_imports(path):
        target = layer(module if name is None or "." in module else f"{module}.{name}")
        if own in ALLOWED and target != own:
            assert target in ALLOWED[own], f"{own} must not import {module} ({name})"
        if own != "bench":
            assert target != "bench", f"{module_name(path)} imports the benchmarks"
        if name is not None and name.startswith("_") and not module_name(path).startswith(module):
            raise AssertionError(f"{module_name(path)} imports the private {module}.{name}")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_reaches_into_another_modules_private_names(path):
    tree = ast.parse(path.read_text())
    modules = set()  # local names bound to the project's modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dag_jax"):
            modules |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name.startswith("dag_jax")}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            raise AssertionError(f"{module_name(path)} uses {node.value.id}.{node.attr}")


def test_runtime_modules_import_neither_torch_nor_the_benchmarks():
    code = (
        "import sys, dag_jax.train, dag_jax.train.__main__, dag_jax.eval.evaluate, "
        "dag_jax.export, dag_jax.sample, dag_jax.pipeline;"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('dag_jax.bench')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


def test_the_package_has_no_import_cycles():
    graph = {module_name(p): set() for p in FILES}
    for path in FILES:
        for module, name in project_imports(path):
            full = f"{module}.{name}" if name and f"{module}.{name}" in graph else module
            if full in graph and full != module_name(path):
                graph[module_name(path)].add(full)
    # packages' __init__ re-exporting their own modules are not cycles
    for pkg in graph:
        graph[pkg] = {m for m in graph[pkg] if not m.startswith(pkg + ".")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
