"""Safehold proxy package."""
