"""Safehold broker package."""
