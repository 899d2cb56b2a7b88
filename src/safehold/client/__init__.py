"""Safehold client package."""
