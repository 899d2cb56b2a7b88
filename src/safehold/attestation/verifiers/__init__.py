"""Safehold attestation verifiers package."""
