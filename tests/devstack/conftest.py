"""Fixtures for the tests of the local stack (``safehold up``)."""

from __future__ import annotations

import pytest

from tests.support.devstack import snapshot_env


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Environment running the CLI from a snapshot of the package (stable measurement while the
    tree changes)."""
    return snapshot_env(tmp_path_factory)
