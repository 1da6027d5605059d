"""The code stays as the style notes say: sans-I/O cores, ruff and mypy clean."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SANS_IO = ["chorus/protocol.py", "chorus/extensions.py", "chorus/codes.py", "chorus/ids.py",
           "native/codec_pure.py", "ingest/records.py", "gateway/httpreq.py", "ingest/sampling.py", "ingest/rules.py"]
IO_MODULES = {"asyncio", "picows", "redis", "aiokafka", "uvloop", "socket", "select", "sqlite3"}


@pytest.mark.parametrize("path", SANS_IO)
def test_protocol_cores_do_no_io(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & IO_MODULES, f"{path} imports {imported & IO_MODULES}"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_is_clean() -> None:
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean() -> None:
    out = _run("mypy", ".")  # the whole tree, tests included; the roles through .venv/typecheck
    assert out.returncode == 0, out.stdout + out.stderr
