"""The import arrows of docs/ARCHITECTURE.md: adapters → bot → engine/memory, and nothing
runs at import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PLATFORMS = {"discord", "twitchio"}
FORBIDDEN = {
    "engine": PLATFORMS | {"sqlalchemy", "memory", "bot", "adapters", "alembic"},
    "memory": PLATFORMS | {"torch", "transformers", "engine", "bot", "adapters"},
    "bot": PLATFORMS | {"adapters", "torch", "transformers"},
    "bot.cli": PLATFORMS | {"adapters", "torch", "transformers"},
    "memory.store": PLATFORMS | {"torch", "transformers", "engine", "bot", "adapters"},
    "engine.llm_manager": PLATFORMS | {"sqlalchemy", "memory", "bot", "adapters"},
}


def _loaded_after_import(module: str) -> set[str]:
    code = (
        "import json, sys\n"
        f"import {module}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_forbidden_imports_absent(module: str) -> None:
    leaked = _loaded_after_import(module) & FORBIDDEN[module]
    assert not leaked, f"importing {module} pulled in {sorted(leaked)}"


def test_bot_modules_do_not_import_adapters_statically() -> None:
    """No file under bot/, engine/ or memory/ imports an adapter module at top level."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for package in ("bot", "engine", "memory"):
        for path in (root / package).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in tree.body:
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path.name}: {n}" for n in names
                              if n.split(".")[0] in {"adapters", "discord", "twitchio"}]
    assert offenders == []
