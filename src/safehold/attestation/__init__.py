"""Safehold attestation package."""
