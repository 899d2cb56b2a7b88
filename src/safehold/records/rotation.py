"""Key rotation of a :class:`~safehold.records.engine.RecordEngine`: which key ids seal the rows
(:func:`key_usage`) and re-encryption of every row not under the primary key (:func:`rekey`).

New writes always use the keyset's primary key; :func:`rekey` moves older rows over in batches
(one store transaction per batch, CAS on every row) and is safe to interrupt and resume, because
rows already under the primary are skipped. Then ``keyset.retire(old)`` once :func:`key_usage`
no longer names the old id. ``RecordEngine.key_usage`` / ``RecordEngine.rekey`` call these.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from safehold.errors import ConflictError
from safehold.records.errors import RecordConflictError

if TYPE_CHECKING:
    from safehold.records.engine import RecordEngine

__all__ = ["RekeyCounts", "key_usage", "rekey"]


@dataclass(frozen=True)
class RekeyCounts:
    """Progress / result of :func:`rekey` (cumulative over the whole run).

    Attributes:
        namespace: the record namespace being worked on ("" once finished).
        scanned: rows looked at.
        rekeyed: rows re-encrypted under the primary key (and committed).
        already_current: rows that were already under the primary key.
        retried_batches: batches redone because a concurrent writer changed a row (CAS).
    """

    namespace: str = ""
    scanned: int = 0
    rekeyed: int = 0
    already_current: int = 0
    retried_batches: int = 0


def key_usage(engine: RecordEngine, namespaces: Iterable[str] | None = None) -> dict[int, int]:
    """``{key id: rows sealed under it}`` from the envelope headers (nothing is decrypted).

    Use before ``keyset.retire(old)``: the old id must be absent.

    Raises:
        RecordCorruptedError: a row's frame or envelope header is malformed.
    """
    usage: Counter[int] = Counter()
    for ns in engine.namespaces() if namespaces is None else namespaces:
        for row in engine.store.scan_all(engine.store_namespace(ns)):
            kid = engine.frame.key_id(row)
            if kid is not None:
                usage[kid] += 1
    return dict(usage)


def rekey(
    engine: RecordEngine,
    *,
    batch_size: int = 100,
    progress: Callable[[RekeyCounts], None] | None = None,
    namespaces: Iterable[str] | None = None,
    max_retries: int = 8,
) -> RekeyCounts:
    """Re-encrypt every row not under the primary key, in batches.

    Each batch of up to ``batch_size`` rows is authenticated, re-sealed under the primary
    key with version + 1, and written in one store transaction with CAS on every row; a
    row changed concurrently makes that batch roll back and be redone from a fresh read.
    ``progress`` is called after every committed batch. Interrupting (exception, SIGKILL)
    loses nothing: committed batches are under the new key, the rest still opens under the
    old key, and running ``rekey`` again continues (already-current rows are skipped).

    Note: rekeyed rows get a new version, so writers holding the old version get a conflict.

    Args:
        batch_size: rows per batch, 1..10000.
        progress: called with cumulative :class:`RekeyCounts` after each batch.
        namespaces: record namespaces to cover; default every registered one.
        max_retries: how often one batch may be redone after conflicts before giving up.

    Returns:
        Final :class:`RekeyCounts` (``namespace`` = "").

    Raises:
        RecordTamperedError subclasses: a row failed authentication (nothing of its batch
            is written; rows of earlier batches stay rekeyed).
        RecordConflictError: a batch kept conflicting ``max_retries`` times.
        StoreUnavailableError: the store went away (resume later).
    """
    if not 1 <= batch_size <= 10_000:
        raise ValueError(f"batch_size must be 1..10000, got {batch_size}")
    counts = RekeyCounts()
    primary = engine.codec.primary_key_id()
    if primary is None:
        return counts  # keyless codec: nothing to rotate
    for ns in engine.namespaces() if namespaces is None else list(namespaces):
        sns = engine.store_namespace(ns)
        counts = replace(counts, namespace=ns)
        after: bytes | None = None
        retries = 0
        while True:
            rows = engine.store.scan(sns, after=after, limit=batch_size)
            if not rows:
                break
            stale = [r for r in rows if engine.frame.key_id(r) != primary]
            writes = []
            for r in stale:
                kb, value = engine.frame.open(r, None)
                writes.append((r, engine.frame.seal(sns, r.key, r.version + 1, kb, value)))
            if writes:
                try:
                    with engine.store.transaction() as tx:
                        for r, blob in writes:
                            tx.put(sns, r.key, blob, expected_version=r.version)
                except ConflictError as e:
                    retries += 1
                    counts = replace(counts, retried_batches=counts.retried_batches + 1)
                    if retries > max_retries:
                        raise RecordConflictError(
                            f"rekey of namespace {ns!r} gave up after {max_retries} "
                            f"conflicting retries: {e}"
                        ) from None
                    continue  # same page again, freshly read
            retries = 0
            counts = replace(
                counts,
                scanned=counts.scanned + len(rows),
                rekeyed=counts.rekeyed + len(writes),
                already_current=counts.already_current + len(rows) - len(writes),
            )
            if progress is not None:
                progress(counts)
            if len(rows) < batch_size:
                break
            after = rows[-1].key
    return replace(counts, namespace="")
