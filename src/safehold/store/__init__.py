"""Safehold store package."""
