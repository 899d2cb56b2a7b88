"""Helpers for the freshness tests.

:class:`InProcessAnchor` is a TEST DOUBLE: it stands in for the anchor member *processes* in unit
tests only. It runs the real member rules (``MemberCore``) and the real majority rules
(``combine_*``) in this process, without RA-TLS or HTTP; the process tests use the real members
(``anchor/server.py``) through ``QuorumAnchor``.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from safehold.freshness.anchor.base import (
    AnchorHead,
    MemberInfo,
    MemberReply,
    combine_advance,
    combine_head,
    combine_owner,
)
from safehold.freshness.anchor.core import MemberCore
from safehold.freshness.anchor.statements import SignedOwnerStatement, sign_owner_statement
from safehold.freshness.errors import AnchorUnavailableError
from safehold.freshness.store import FreshStore
from safehold.freshness.vmap import NamespacePolicy
from safehold.records.fresh import POSTINGS_POLICY
from safehold.records.search import NAMESPACE_SUFFIX, PREFIX_LEN

MAC_KEY = bytes(range(32))
#: The records service's policy: ``*.postings`` (format 5) and ``*.search`` (older postings).
POLICY = NamespacePolicy(POSTINGS_POLICY)
#: A posting namespace of the records service (format 5) and its prefix length.
POSTINGS_NS = f"records:patients{NAMESPACE_SUFFIX}"
PLEN = PREFIX_LEN


class Owner:
    """The data owner's Ed25519 key (kept by the owner CLI in real use)."""

    def __init__(self) -> None:
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.public = self.key.public_key()

    def private_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def public_pem(self) -> str:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()


class InProcessAnchor:
    """TEST DOUBLE for the anchor member processes (see the module docstring).

    Args:
        n: members. owner: the pinned owner. client: the workload name (certificate CN) this
            client writes as.
    """

    def __init__(self, n: int = 3, owner: Owner | None = None, client: str = "records") -> None:
        self.owner = owner or Owner()
        self.client = client
        self.cores: list[MemberCore | None] = []
        for _ in range(n):
            c = MemberCore(n, self.owner.public)
            c.ready = True  # a fresh anchor: all members start together, empty and ready
            self.cores.append(c)
        self.n = n
        self.calls = 0

    # -- member control ------------------------------------------------------------------

    def kill(self, i: int) -> None:
        """Member ``i`` stops answering (its memory is gone)."""
        self.cores[i] = None

    def restart(self, i: int) -> bool:
        """Member ``i`` comes back empty and catches up from the others; True if ready."""
        c = MemberCore(self.n, self.owner.public)
        self.cores[i] = c
        return self.catch_up(i)

    def catch_up(self, i: int) -> bool:
        c = self.cores[i]
        assert c is not None
        return c.catch_up([o.dump() if o is not None else None for j, o in enumerate(self.cores) if j != i])

    # -- Anchor ----------------------------------------------------------------------------

    def _each(self, fn) -> list[MemberReply | BaseException]:
        self.calls += 1
        out: list[MemberReply | BaseException] = []
        for c in self.cores:
            out.append(AnchorUnavailableError("member down") if c is None else fn(c))
        return out

    def head(self, ledger: str) -> AnchorHead | None:
        return combine_head(ledger, self._each(lambda c: c.read(ledger)), self.n)

    def advance(self, ledger: str, prev: AnchorHead, new: AnchorHead) -> AnchorHead:
        replies = self._each(lambda c: c.advance(ledger, prev, new, client=self.client))
        return combine_advance(ledger, new, replies, self.n)

    def initialise(self, statement: SignedOwnerStatement) -> AnchorHead:
        st = statement.statement
        return combine_owner(st.ledger, st.head(),
                             self._each(lambda c: c.apply_owner(statement, client=self.client)), self.n)

    def members(self) -> list[MemberInfo]:
        return [c.info() for c in self.cores if c is not None]

    # -- owner ------------------------------------------------------------------------------

    def sign_for(self, fs: FreshStore, action: str = "initialise") -> SignedOwnerStatement:
        from safehold.freshness.recovery import statement_for

        return sign_owner_statement(statement_for(fs, action), self.owner.private_pem())


def open_fresh(inner, anchor, *, ledger: str = "records", initialise: bool = True, **kw) -> FreshStore:
    """A FreshStore on ``inner``; a new ledger is initialised with the owner's statement."""
    from safehold.freshness.errors import LedgerUninitialisedError

    kw.setdefault("policy", POLICY)
    fs = FreshStore(inner, ledger=ledger, mac_key=MAC_KEY, anchor=anchor, **kw)
    if initialise and isinstance(fs.problem, LedgerUninitialisedError):
        fs.reanchor(anchor.sign_for(fs, "initialise"))
    return fs


def sqlite_copy(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite store file (the online backup API: what an operator's
    backup tool does), replacing ``dst``."""
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(dst) + suffix)
        if p.exists():
            p.unlink()
    with closing(sqlite3.connect(src)) as a, closing(sqlite3.connect(dst)) as b:
        a.backup(b)


def restore_file(backup: Path, live: Path) -> None:
    """Put an earlier copy back over the live file (the store must be closed)."""
    for suffix in ("-wal", "-shm"):
        p = Path(str(live) + suffix)
        if p.exists():
            os.unlink(p)
    shutil.copyfile(backup, live)


class Engine:
    """One database engine under test, with the operator's powers: SQL on the rows table,
    backups and restores (of the rows, not through the service)."""

    name = ""

    def open(self):  # noqa: ANN201 - a Store
        raise NotImplementedError

    def sql(self, stmt: str, params: tuple = ()) -> None:
        """Run one statement on the database directly (``?`` placeholders on both engines)."""
        raise NotImplementedError

    def name_namespace(self, name: str) -> None:
        """Enter ``name`` in the namespace dictionary as the DBA would (no-op if it is there).

        The id is the largest + 1, as both stores assign it: PostgreSQL's ``id`` has no identity
        sequence (a schema copied table by table keeps creating ids), so an ``INSERT`` of the
        name alone fails there. ``WHERE true`` lets SQLite parse the upsert after a ``SELECT``."""
        self.sql("INSERT INTO safehold_namespaces (id, name) SELECT COALESCE(max(id), 0) + 1, ? "
                 "FROM safehold_namespaces WHERE true ON CONFLICT (name) DO NOTHING", (name,))

    def backup(self) -> str:
        """Copy the store now; returns a token for :meth:`restore`."""
        raise NotImplementedError

    def restore(self, token: str) -> None:
        """Put a backup's rows back (works with the service running or stopped)."""
        raise NotImplementedError


class SqliteEngine(Engine):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._n = 0

    def open(self):  # noqa: ANN201
        from safehold.store.sqlite import SqliteStore

        return SqliteStore(self.path)

    def sql(self, stmt: str, params: tuple = ()) -> None:
        with closing(sqlite3.connect(self.path, timeout=10)) as c, c:
            c.execute(stmt, params)

    def backup(self) -> str:
        self._n += 1
        dst = self.path.with_name(f"{self.path.stem}.backup{self._n}.db")
        sqlite_copy(self.path, dst)
        return str(dst)

    def restore(self, token: str) -> None:
        with closing(sqlite3.connect(self.path, timeout=10)) as c:
            c.execute("ATTACH DATABASE ? AS bk", (token,))
            with c:
                c.execute("DELETE FROM main.safehold_rows")
                c.execute("INSERT INTO main.safehold_rows SELECT * FROM bk.safehold_rows")

    def restore_file(self, token: str) -> None:
        """Copy the backup file over the store file (the store must be closed)."""
        restore_file(Path(token), self.path)


class PostgresEngine(Engine):
    name = "postgres"

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema
        self._n = 0

    def open(self):  # noqa: ANN201
        from safehold.store.postgres import PostgresStore

        return PostgresStore(self.dsn, schema=self.schema, max_size=4, application_name="fresh-test")

    def sql(self, stmt: str, params: tuple = ()) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as c:
            c.execute(f'SET search_path TO "{self.schema}"')
            c.execute(stmt.replace("?", "%s"), params)

    def backup(self) -> str:
        self._n += 1
        name = f"bk{self._n}"
        self.sql(f"CREATE TABLE {name} AS SELECT * FROM safehold_rows")
        return name

    def restore(self, token: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn) as c, c.transaction():
            c.execute(f'SET LOCAL search_path TO "{self.schema}"')
            c.execute("DELETE FROM safehold_rows")
            c.execute(f"INSERT INTO safehold_rows SELECT * FROM {token}")

    restore_file = restore
