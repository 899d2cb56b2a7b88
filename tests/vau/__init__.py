"""Tests of ``safehold.vau``."""
