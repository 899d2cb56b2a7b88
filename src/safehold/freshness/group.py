"""Group commit over a FreshStore with the anchor advance off the committer's path.

Same contract as the records service's ``GroupCommit`` (``records/commit.py``): callers hand
:meth:`FreshGroupCommit.run` a *unit* that writes through the store and block; one committer
thread runs every waiting unit in its own savepoint inside **one** store transaction — one
journal entry, one COMMIT — and each caller returns only once the batch is **anchored**.

The difference: ``GroupCommit`` over a FreshStore works unchanged, but its committer waits for
the anchor inside the transaction's exit, so the next batch starts only after the anchor round
trip. Here the committer commits with ``transaction(wait=False)`` and goes on with the next
batch at once, while the callers of the previous batch wait for its anchoring in their own
threads; the anchorer covers several batches with one advance. With a few milliseconds of
anchor latency this keeps the database busy (``bench/freshness.py`` measures both).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from safehold.freshness.store import FreshStore

__all__ = ["IDLE_SECONDS", "FreshGroupCommit"]

#: The committer thread ends after this long without work (a new one starts on demand).
IDLE_SECONDS = 30.0
T = TypeVar("T")
_Unit = Callable[[], Any]


class FreshGroupCommit:
    """Pipelined group commit (module docstring).

    Args:
        store: the FreshStore every unit writes to.

    Attributes:
        store: that store (repositories and audit logs sharing the committer use it).
    """

    def __init__(self, store: FreshStore) -> None:
        self.store = store
        self._abort_hooks: list[Callable[[], None]] = []
        self._cond = threading.Condition()
        self._pending: list[tuple[_Unit, Future[tuple[Any, int]]]] = []
        self._thread: threading.Thread | None = None
        self._working = False
        store.anchorer.busy.append(lambda: self._working or bool(self._pending))

    def on_abort(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after every failed commit."""
        self._abort_hooks.append(hook)

    def run(self, unit: Callable[[], T]) -> T:
        """Run ``unit()`` in the next group transaction; return its result once that transaction
        is committed and anchored.

        Raises:
            whatever ``unit`` raised (its savepoint was rolled back, the others commit); the
            commit's own error (nothing of the batch is durable); NotAnchoredError (the batch is
            stored but the anchor did not confirm it within the store's ``wait_timeout``).
        """
        done: Future[tuple[Any, int]] = Future()
        with self._cond:
            self._pending.append((unit, done))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="safehold-fresh-group-commit",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        result, ticket = done.result()
        self.store.wait_for(ticket, "this write")
        value: T = result
        return value

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    if not self._cond.wait(timeout=IDLE_SECONDS) and not self._pending:
                        self._thread = None
                        return
                batch, self._pending = self._pending, []
                self._working = True
            outcomes: list[tuple[bool, Any]] = [(False, RuntimeError("group commit did not run"))
                                                ] * len(batch)
            ticket = 0
            try:
                outcomes, ticket = self._commit([u for u, _ in batch])
            finally:
                self._working = False
                for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
                    if ok:
                        fut.set_result((value, ticket))
                    else:
                        fut.set_exception(value)

    def _commit(self, batch: list[_Unit]) -> tuple[list[tuple[bool, Any]], int]:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self.store.transaction(wait=False) as tx:
                for unit in batch:
                    try:
                        with self.store.transaction():  # a savepoint per unit
                            outcomes.append((True, unit()))
                    except Exception as e:  # noqa: BLE001 - handed to that unit's caller
                        outcomes.append((False, e))
        except BaseException as e:  # the commit failed: nothing of the batch is durable
            for hook in self._abort_hooks:
                hook()
            return [(False, e)] * len(batch), 0
        return outcomes, int(getattr(tx, "ticket", 0))
