"""The storage layer holds bytes; it must not import the control plane's pools or planner.

Why: issue 9's layout keeps the planes apart, so a storage module can be reused by the executor
without dragging in pool bookkeeping. The pool/storage pairs (``Tier``) live in
``kvtier/manager/block_manager.py``. The check reads each file's imports with ``ast`` (no
import runs, no torch needed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvtier

STORAGE = Path(kvtier.__file__).parent / "storage"
FORBIDDEN = ("kvtier.core.pool", "kvtier.core.block", "kvtier.plan")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, and ``module.name`` for each ``from`` name."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_storage_imports_no_control_plane_pools() -> None:
    files = sorted(STORAGE.rglob("*.py"))
    assert len(files) >= 10  # the walk found the package
    bad = {
        str(p.relative_to(STORAGE)): sorted(n for n in imported_modules(p) if forbidden(n))
        for p in files
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("from kvtier.core import pool\nimport kvtier.plan.planner\n")
    assert sorted(n for n in imported_modules(f) if forbidden(n)) == [
        "kvtier.core.pool",
        "kvtier.plan.planner",
    ]
