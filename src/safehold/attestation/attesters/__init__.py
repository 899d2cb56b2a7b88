"""Safehold attestation attesters package."""
