"""The layers stay apart: accounting/ (the books) imports nothing from federation/ or
dashboard/; the broker calls into the books, and the dashboards read both."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_accounting_imports_neither_federation_nor_dashboard():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path)
                                            if m.split(".")[0] in ("federation", "dashboard"))
        for path in (ROOT / "accounting").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_broker_does_not_import_the_dashboards():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path)
                                            if m.split(".")[0] == "dashboard")
        for path in (ROOT / "federation").rglob("*.py") if path.name != "cli.py"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_provider_agent_starts_without_the_brokers_server_libraries():
    """`parallex provide` runs on every lab machine and starts in every agent test: it loads
    neither the web framework nor the database layer (they took ~0.7 s of its start)."""
    import subprocess
    import sys

    # --dry-run imports everything `parallex provide` imports, then prints and exits.
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "federation.cli", "provide",
                          "--dry-run"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "policy:" in run.stdout
    loaded = {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines()
              if line.startswith("import time:") and "|" in line}
    assert "federation.agent" in loaded
    server_side = {"fastapi", "starlette", "sqlmodel", "sqlalchemy", "alembic", "uvicorn"}
    assert loaded & server_side == set()
