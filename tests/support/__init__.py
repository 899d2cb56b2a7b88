"""Shared test helpers (importable as ``tests.support.…`` from any test package)."""
