"""Tests of ``safehold.broker``."""
