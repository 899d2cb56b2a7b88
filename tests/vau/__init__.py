"""Tests of safehold.vau (a package so its conftest does not shadow the root conftest module)."""
