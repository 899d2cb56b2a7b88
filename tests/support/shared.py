"""Paths to the shared test material, and helpers every test folder uses.

Test material is read from ``../shared`` beside the checkout, or from ``SAFEHOLD_SHARED_DIR``.
Missing material skips the test on a laptop and fails it when ``CI`` is set, so CI can never
silently skip. PostgreSQL tests read ``SAFEHOLD_TEST_POSTGRES_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``); the fixtures are in tests/conftest.py.
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
EVIDENCE = SHARED / "evidence"
VECTORS = SHARED / "vectors"
DATA = SHARED / "data"
VAU_VECTORS = VECTORS / "vau"
POSTGRES_DSN = os.environ.get(
    "SAFEHOLD_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


def need_shared(path: Path) -> Path:
    """Return ``path`` or skip (fail under CI) when ../shared is not beside the checkout."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared test material missing under CI: {path}")
        pytest.skip(f"shared test material not found: {path}")
    return path


def evidence_dir() -> Path:
    """``../shared/evidence`` (Evidence captured on real machines, listed in its INDEX.md); skips
    the calling test without it, fails under CI."""
    need_shared(EVIDENCE / "INDEX.md")
    return EVIDENCE


def vau_vector(rel: str) -> bytes:
    """Bytes of a file under vectors/vau (skips when absent, fails under CI)."""
    return need_shared(VAU_VECTORS / rel).read_bytes()


def snapshot_package(dest: Path) -> Path:
    """Copy src/safehold to ``dest/safehold`` without byte code and hidden files; return it.

    Processes started from the copy (``PYTHONPATH=dest``) keep one workload measurement while
    the working tree is edited — the measurement covers every package file
    (docs/developing.md, "the measurement trap").
    """
    pkg = dest / "safehold"
    shutil.copytree(ROOT / "src" / "safehold", pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return pkg


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (racy by nature; servers should still retry on EADDRINUSE)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_path(*parts: str) -> Path:
    """``SHARED/parts…``; skips (fails under CI) when it is missing."""
    return need_shared(SHARED.joinpath(*parts))


def load_json(*parts: str) -> Any:
    """Parse a JSON file of the shared material as it is."""
    return json.loads(shared_path(*parts).read_text("utf-8"))
