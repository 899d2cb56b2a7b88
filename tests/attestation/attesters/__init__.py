"""Tests of ``safehold.attestation.attesters``."""
