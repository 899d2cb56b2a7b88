"""Tests of ``safehold.attestation``."""
