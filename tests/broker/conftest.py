"""Fixtures for the broker tests."""

from __future__ import annotations

import pytest

from tests.support.shared import snapshot_package


@pytest.fixture(scope="session")
def snap(tmp_path_factory) -> dict:
    """A snapshot of the package for broker processes: ``{"PYTHONPATH": …, "root": Path}``.
    The broker's measurement then covers exactly the code it runs, unaffected by edits to the
    working tree while the tests run (docs/developing.md, the measurement trap)."""
    dst = snapshot_package(tmp_path_factory.mktemp("snapshot")).parent
    return {"PYTHONPATH": str(dst), "root": dst}
