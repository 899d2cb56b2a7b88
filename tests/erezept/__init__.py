"""Tests of ``safehold.erezept``."""
