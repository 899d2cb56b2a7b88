"""The format of the search postings, and rebuilding them when the format changes.

The posting terms (:mod:`safehold.records.tokens`) changed from whole normalised values
(format 1) to folded values, prefixes, date levels and references (format 2); the posting rows
changed from a GCM envelope of the id to AES-SIV rows (format 3, issue 17,
:mod:`safehold.records.search`), then the id those rows seal to a compact encoding, a canonical
UUID as ``0x00 || 16 bytes`` instead of 36 characters (format 4, issue 17), then the blind term
prefix from 16 to 10 bytes, in a namespace of their own: ``<namespace>.postings`` instead of
``<namespace>.search`` (format 5, issue 17; the freshness layer groups a namespace by one prefix
length for good). A store written by older code holds postings the new search cannot use:
:func:`ensure_search_index` (called when the service opens its repositories, before it serves)
finds the format marker — an engine record ``search-index-format`` in namespace
``<namespace>.meta``, encrypted like every record — and when it is missing or older, drops every
posting row of the old namespace (``.search``, formats 1 to 4) and of the current one (rows of an
interrupted rebuild), posts every record again, then writes the marker. Interrupted, it starts
over at the next start. Over a :class:`~safehold.freshness.store.FreshStore` the old rows are
read and deleted through it (its policy keeps ``*.search`` at 16 bytes,
:data:`safehold.records.fresh.POSTINGS_POLICY`), so the drop is journaled like any write and the
old namespace's groups are checked as they are read: rows the database added there or left out
fail the rebuild (a freshness finding) instead of being dropped unseen.

Run the first start after an upgrade with one replica: a replica of the old code writing
meanwhile would add format-1 postings that nothing removes.
"""

from __future__ import annotations

import logging

from safehold.errors import RecordNotFoundError, RecordTamperedError
from safehold.records.model import decode_stored, postings
from safehold.records.repository import MAX_PAGE, PatientRepository

__all__ = ["INDEX_FORMAT", "ensure_search_index"]

#: The current posting format (see the module docstring).
INDEX_FORMAT = b"safehold/search-index/5"
_MARKER = "search-index-format"
_BATCH = 200
log = logging.getLogger("safehold.records")


def ensure_search_index(repo: PatientRepository) -> int:
    """Rebuild ``repo``'s postings if they are not in :data:`INDEX_FORMAT`; returns the number
    of records posted (0 when the format was current). Every write goes through the
    repository's group committer.

    Raises:
        StoreUnavailableError: as the store (the marker is then not written: the next start
            rebuilds again).
    """
    meta_ns = f"{repo.ns}.meta"
    engine, index = repo.engine, repo.index
    try:
        if engine.get(meta_ns, _MARKER)[0] == INDEX_FORMAT:
            return 0
    except (RecordNotFoundError, RecordTamperedError):
        pass  # no marker (older code or a new store), or a damaged one: rebuild
    store = engine.store

    for ns in (repo.old_index_ns, index.ns):

        def drop_some(ns: str = ns) -> int:
            rows = store.scan(ns, limit=MAX_PAGE)
            for row in rows:
                store.delete(ns, row.key)
            return len(rows)

        while repo.committer.run(drop_some) == MAX_PAGE:
            pass
    posted = 0
    after: bytes | None = None
    while True:
        page = engine.list_page(repo.ns, after=after, limit=_BATCH, skip_tampered=True)
        todo = []
        for rid in page.keys:
            try:
                todo.append((rid, postings(decode_stored(engine.get(repo.ns, rid)[0]))))
            except (RecordNotFoundError, RecordTamperedError):
                continue  # gone meanwhile, or refused on every read anyway

        def post(todo: list[tuple[str, frozenset[str]]] = todo) -> None:
            for rid, terms in todo:
                index.add(rid, sorted(terms))

        repo.committer.run(post)
        posted += len(todo)
        if page.next_after is None:
            break
        after = page.next_after
    repo.committer.run(lambda: engine.put(meta_ns, _MARKER, INDEX_FORMAT))
    if posted:
        log.info("search index of %r rebuilt in format %s: %d records", repo.ns,
                 INDEX_FORMAT.decode(), posted)
    return posted
