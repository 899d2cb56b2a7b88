"""Tests of ``safehold.attestation.verifiers``."""
