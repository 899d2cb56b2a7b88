"""Group commit: every write of the records service goes through one committer thread.

A caller hands :meth:`GroupCommit.run` a *unit* — a function that writes through the store —
and blocks. One committer thread takes every unit waiting, runs each in its own savepoint
inside **one** store transaction (a unit that raises is rolled back alone and its caller gets
the exception), then commits once. Every caller returns only after the commit that holds its
unit is durable, or raises if that commit failed. One commit — one fsync on SQLite — thus
serves a whole batch of concurrent writers.

Why one thread, on one connection:

* **SQLite has one write lock per database file**, and its busy handler *sleep-polls* for it:
  two threads of one process that write at once make the second sleep in steps of up to
  100 ms, which ruins tail latency. Because every write of the process (records, search
  postings, access-audit entries, the namespace registry) runs on this thread, no two
  transactions of the process ever compete for that lock; no process-wide lock is needed.
  (Several processes on one SQLite file still meet the busy handler; PostgreSQL is the engine
  for replicas.)
* The committer's connection keeps its page cache between commits (a connection whose cache
  another connection's commit invalidated has to re-read its pages).

Units must not call :meth:`GroupCommit.run` themselves (the committer would wait for itself).
The thread starts on demand and ends after :data:`IDLE_SECONDS` without work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from safehold.store.base import Store

__all__ = ["IDLE_SECONDS", "Committer", "GroupCommit"]

#: The committer thread ends after this long without work (a new one starts on demand).
IDLE_SECONDS = 30.0

T = TypeVar("T")
_Unit = Callable[[], Any]


class Committer(Protocol):
    """What a repository and an audit log need of a group committer: :class:`GroupCommit`, or
    :class:`~safehold.freshness.group.FreshGroupCommit` over a FreshStore (same contract, each
    caller returns once its batch is committed *and anchored*)."""

    @property
    def store(self) -> Any:
        """The store every unit writes to."""
        ...

    def run(self, unit: Callable[[], T]) -> T:
        """Run ``unit()`` in the next group transaction; its result once committed."""
        ...

    def on_abort(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after every failed commit."""
        ...


class GroupCommit:
    """Runs write units of concurrent callers in shared store transactions (see the module
    docstring).

    Args:
        store: the store every unit writes to (its nested ``transaction()`` calls must become
            savepoints, as both Safehold engines' do).

    Attributes:
        store: that store; a repository and an audit log that share a committer must use it.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._abort_hooks: list[Callable[[], None]] = []
        self._cond = threading.Condition()
        self._pending: list[tuple[_Unit, Future[Any]]] = []
        self._thread: threading.Thread | None = None

    def on_abort(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after every failed commit (e.g. to forget state cached from the
        rolled-back writes)."""
        self._abort_hooks.append(hook)

    def run(self, unit: Callable[[], T]) -> T:
        """Run ``unit()`` inside the next group transaction; return its result once that
        transaction is committed.

        Raises:
            whatever ``unit`` raised (its savepoint was rolled back, the others commit), or the
            commit's own error (e.g. StoreUnavailableError: nothing of the batch is durable).
        """
        done: Future[Any] = Future()
        with self._cond:
            self._pending.append((unit, done))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="safehold-group-commit",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        result: T = done.result()
        return result

    def _serve(self) -> None:
        """The committer thread: one transaction per batch of waiting units."""
        while True:
            with self._cond:
                while not self._pending:
                    if not self._cond.wait(timeout=IDLE_SECONDS) and not self._pending:
                        self._thread = None
                        return
                batch, self._pending = self._pending, []
            failed: tuple[bool, Any] = (False, RuntimeError("group commit did not run"))
            outcomes: list[tuple[bool, Any]] = [failed] * len(batch)
            try:
                outcomes = self._commit([u for u, _ in batch])
            finally:
                for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(value)

    def _commit(self, batch: list[_Unit]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self.store.transaction():
                for unit in batch:
                    try:
                        with self.store.transaction():  # a savepoint per unit
                            outcomes.append((True, unit()))
                    except Exception as e:  # noqa: BLE001 - handed to that unit's caller
                        outcomes.append((False, e))
        except BaseException as e:  # the commit itself failed: nothing of the batch is durable
            for hook in self._abort_hooks:
                hook()
            return [(False, e)] * len(batch)
        return outcomes
