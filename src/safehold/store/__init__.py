"""Untrusted storage: one small interface (:mod:`safehold.store.base`), two engines.

* :class:`safehold.store.sqlite.SqliteStore` — embedded default (stdlib ``sqlite3``, WAL).
* :class:`safehold.store.postgres.PostgresStore` — scale-out (psycopg 3 + psycopg-pool).

:func:`open_store` picks the engine from a URL. See ``docs/storage.md``.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from safehold.store.base import MAX_KEY, MAX_NAMESPACE, Row, Store, StoreOps

__all__ = ["MAX_KEY", "MAX_NAMESPACE", "Row", "Store", "StoreOps", "open_store"]


def open_store(url: str, *, timeout: float | None = None) -> Store:
    """Open a store from a URL.

    Accepted forms:

    * ``sqlite:///relative/or/absolute/path.db`` (``sqlite:////abs/path.db`` also works),
      ``sqlite:path.db`` or a bare file path → :class:`~safehold.store.sqlite.SqliteStore`;
    * ``postgresql://…`` or ``postgres://…`` (a libpq URI) → :class:`~safehold.store.postgres.PostgresStore`.
      The extra query parameter ``schema=NAME`` picks the schema (removed before the URI goes
      to libpq); otherwise a ``search_path`` in ``options=-csearch_path=NAME`` is used; else
      ``public``.

    Args:
        url: as above.
        timeout: SQLite busy timeout / PostgreSQL connect and pool timeout, seconds.

    Raises:
        ValueError: empty URL or unknown scheme.
        StoreError (and subclasses): the engine could not open the database.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("store URL is empty")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("postgresql", "postgres"):
        from safehold.store.postgres import PostgresStore

        if timeout is None:
            return PostgresStore.from_url(url)
        return PostgresStore.from_url(url, timeout=timeout)
    if scheme == "sqlite":
        from safehold.store.sqlite import SqliteStore

        rest = url[len("sqlite:") :]
        if rest.startswith("//"):
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"sqlite URL must not name a host, got {parts.netloc!r}")
            path = unquote(parts.path)
            # sqlite:///rel.db → "/rel.db" names rel.db relative (SQLAlchemy convention);
            # sqlite:////abs.db → "//abs.db" names /abs.db.
            path = path[1:] if path.startswith("/") else path
        else:
            path = unquote(rest)
        if not path:
            raise ValueError("sqlite URL has no file path")
        return SqliteStore(path) if timeout is None else SqliteStore(path, timeout=timeout)
    if len(scheme) > 1 and "/" not in scheme and "\\" not in scheme:
        raise ValueError(f"unknown store URL scheme {scheme!r}; use sqlite:/// or postgresql://")
    from safehold.store.sqlite import SqliteStore

    return SqliteStore(url) if timeout is None else SqliteStore(url, timeout=timeout)
