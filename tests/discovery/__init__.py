"""Tests of safehold.discovery (a package, so its conftest does not shadow tests/conftest.py)."""
