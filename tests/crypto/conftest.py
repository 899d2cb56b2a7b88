"""Fixtures for tests of ``safehold.crypto``."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.shared import load_json


@pytest.fixture(scope="session")
def rfc9497_ristretto() -> dict[str, Any]:
    """The ristretto255-SHA512 mode-0 suite of ``vectors/rfc9497_vectors.json`` (RFC 9497 A.1.1)."""
    data = load_json("vectors", "rfc9497_vectors.json")
    suites = [s for s in data["suites"] if s["identifier"] == "ristretto255-SHA512" and s["mode"] == 0]
    assert len(suites) == 1, "vector file must hold exactly one ristretto255-SHA512 mode-0 suite"
    assert suites[0]["vectors"], "no vectors in the ristretto255-SHA512 suite"
    return suites[0]
