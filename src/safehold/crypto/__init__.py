"""Safehold crypto package."""
