"""Tests of ``safehold.store``."""
