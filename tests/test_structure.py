"""The shape of the house: import arrows between packages, no import cycle between modules,
adapters independent of each other, and small modules and functions. Static (ast), so every
import counts: top level, inside functions and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("adapters", "bot", "engine", "memory", "migrations")
# Which of our packages each package may import (docs/ARCHITECTURE.md: adapters → bot →
# engine / memory).
ALLOWED = {
    "adapters": {"adapters", "bot"},
    "bot": {"bot", "engine", "memory"},
    "engine": {"engine"},
    "memory": {"memory"},
    "migrations": {"migrations", "memory"},
}
SHARED_ADAPTER_HELPERS = "adapters.common"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_modules() -> dict[str, Path]:
    return {module_name(path): path
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> Iterator[str]:
    """Our modules that ``path`` imports (``from pkg import submodule`` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        yield from (t for t in targets if t in known)


def import_graph() -> dict[str, set[str]]:
    modules = product_modules()
    known = set(modules)
    return {name: set(imported_modules(path, name, known)) - {name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_real_imports() -> None:
    graph = import_graph()
    assert "bot.service" in graph["bot.runtime"]
    assert "memory.store.records" in graph["memory.store.facade"]
    assert "bot.commands" in graph["adapters.discord_adapter.commands"]


def test_no_import_cycle_between_modules() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_only_along_the_arrows() -> None:
    offenders = [f"{source} imports {target}"
                 for source, targets in import_graph().items() for target in targets
                 if target.split(".")[0] not in ALLOWED[source.split(".")[0]]]
    assert offenders == []


def test_adapters_do_not_import_each_other() -> None:
    def adapter_of(module: str) -> str | None:
        parts = module.split(".")
        if parts[0] != "adapters" or len(parts) < 2 or module.startswith(
                SHARED_ADAPTER_HELPERS):
            return None
        return parts[1]

    offenders = [f"{source} imports {target}"
                 for source, targets in import_graph().items() for target in targets
                 if adapter_of(source) and adapter_of(target)
                 and adapter_of(source) != adapter_of(target)]
    assert offenders == []


@pytest.mark.parametrize("package", ["adapters", "bot", "engine", "memory"])
def test_modules_and_functions_stay_small(package: str) -> None:
    too_big = []
    for path in sorted((ROOT / package).rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_big.append(f"{path.relative_to(ROOT)}:{node.name}: {length} lines")
    assert too_big == []


def test_the_engine_interface_imports_nothing_heavy() -> None:
    """``engine.client`` (what the runtime talks to) and the data types it speaks are the
    ground floor: importing them loads neither torch nor transformers."""
    import subprocess
    import sys

    probe = ("import sys, engine.client, engine.types; "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], check=True)
    assert result.stdout.strip() == "[]"


def test_the_architecture_map_names_every_module() -> None:
    """docs/ARCHITECTURE.md's map is a map: every package, sub-package and module is on it."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    map_text = text[text.index("## Layers and arrows"):text.index("Imports go one way")]
    missing = [str(path.relative_to(ROOT)) for package in ("adapters", "bot", "engine", "memory")
               for path in sorted((ROOT / package).rglob("*.py"))
               if (path.stem != "__init__" and path.stem not in map_text)
               or (path.parent.name + "/" not in map_text and path.parent.name != package)]
    assert missing == []


SERVING = "engine.serving"
SERVING_MAY_USE = {"engine.types", "engine.errors"}


def test_the_serving_stack_is_entered_through_its_package() -> None:
    """The serving stack (``engine/serving/``) is a wing of its own: the rest of the product
    uses only what ``engine.serving`` exports, and the stack leans on nothing of the engine but
    its data types and errors, so it can change (or be replaced) without touching the rest."""
    inside = [f"{source} imports {target}" for source, targets in import_graph().items()
              if source.startswith(SERVING + ".") for target in targets
              if not target.startswith(SERVING) and target not in SERVING_MAY_USE]
    reaching_in = [f"{source} imports {target}" for source, targets in import_graph().items()
                   if not source.startswith(SERVING) for target in targets
                   if target.startswith(SERVING + ".")]
    assert inside == [] and reaching_in == []


def test_the_runtime_does_not_stand_on_the_seed_facade() -> None:
    """The seed's ``LLMManager`` is a facade for the seed's callers; the runtime talks to the
    engine through ``Engine`` (``engine.core``), so the facade can keep the seed's habits."""
    offenders = [f"{source} imports {target}" for source, targets in import_graph().items()
                 if source.split(".")[0] in ("bot", "adapters") for target in targets
                 if target in ("engine.llm_manager", "engine")]
    assert offenders == []
