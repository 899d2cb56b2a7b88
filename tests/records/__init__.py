"""Tests of ``safehold.records``."""
