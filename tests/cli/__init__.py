"""Tests of ``safehold.cli``."""
