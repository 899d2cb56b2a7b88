"""Tests of ``safehold.ratls``."""
