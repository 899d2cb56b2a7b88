"""Paths to the shared test material and process helpers for the test packages under tests/.

Same lookup rules as tests/conftest.py (``SAFEHOLD_SHARED_DIR``, else ``../shared`` beside the
checkout); missing material skips, or fails under ``CI``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _shared_dir() -> Path:
    env = os.environ.get("SAFEHOLD_SHARED_DIR")
    if env:
        return Path(env)
    for cand in (ROOT.parent / "shared", ROOT / "shared"):
        if cand.is_dir():
            return cand
    return ROOT.parent / "shared"


SHARED = _shared_dir()
VAU_VECTORS = SHARED / "vectors" / "vau"


def need(path: Path) -> Path:
    """``path`` if it exists; else skip (fail under CI)."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared test material missing under CI: {path}")
        pytest.skip(f"shared test material not found: {path}")
    return path


def vau_vector(rel: str) -> bytes:
    """Bytes of a file under vectors/vau (skips when absent)."""
    return need(VAU_VECTORS / rel).read_bytes()


def snapshot_src(dest: Path) -> Path:
    """Copy src/safehold to ``dest/safehold`` (no byte code); processes run from the copy keep one
    workload measurement while the tree is edited (docs/developing.md, the measurement trap)."""
    pkg = dest / "safehold"
    shutil.copytree(
        ROOT / "src" / "safehold", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    )
    return pkg


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (racy; servers should still retry)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_path(*parts: str) -> Path:
    """``SHARED/parts…``; skips (fails under CI) when it is missing."""
    return need(SHARED.joinpath(*parts))


def load_json(*parts: str) -> Any:
    """Parse a JSON file of the shared material as it is."""
    return json.loads(shared_path(*parts).read_text("utf-8"))
