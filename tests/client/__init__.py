"""Tests of ``safehold.client``."""
