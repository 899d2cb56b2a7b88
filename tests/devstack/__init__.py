"""Tests of ``safehold.devstack``."""
