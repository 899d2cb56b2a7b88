"""Fixtures for the RA-TLS tests."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from safehold.attestation.errors import SimulatedTEEWarning


@pytest.fixture(autouse=True)
def _quiet_simulated_tee() -> Iterator[None]:
    """The simulated TEE (the only one that exists here) warns on every appraisal; these tests
    use it on purpose, so its warning is not shown (tests/attestation checks it is raised)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulatedTEEWarning)
        yield
