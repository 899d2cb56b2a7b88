"""Exceptions of the development stack (``safehold up`` / ``demo`` / ``status``)."""

from __future__ import annotations

from safehold.errors import SafeholdError

__all__ = ["DataDirBusyError", "PlaintextFoundError", "StackError"]


class StackError(SafeholdError):
    """The broker or the records service did not start (names which, and why)."""


class DataDirBusyError(StackError):
    """Another ``safehold up`` / ``safehold demo`` holds the data directory's ``up.lock``."""


class PlaintextFoundError(SafeholdError):
    """A patient name, SSN or id was found in clear in the database file (must never happen)."""
