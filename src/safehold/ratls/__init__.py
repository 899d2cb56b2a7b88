"""Safehold ratls package."""
