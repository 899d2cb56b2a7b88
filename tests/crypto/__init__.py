"""Tests of ``safehold.crypto``."""
