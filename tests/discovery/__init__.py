"""Tests of ``safehold.discovery``."""
