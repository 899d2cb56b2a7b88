"""Safehold records package."""
