"""Safehold cli package."""
