"""Tests of ``safehold.proxy``."""
