"""Fixtures for the VAU tests; shared material is located through tests/support/shared.py.
PostgreSQL fixtures (``postgres_dsn``, ``pg_schema``) come from the root conftest."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from safehold.vau.erp import load_vau_private_key
from tests.support.shared import vau_vector


@pytest.fixture(scope="session")
def ibm_vau_key() -> ec.EllipticCurvePrivateKey:
    """The E-Rezept test VAU key from erp-processing-context (same as ref-eRp-FD-Server's)."""
    return load_vau_private_key(vau_vector("erp-processing-context/vau_ecies_brainpoolP256r1_private.pem"))
