"""TEST ONLY: posting rows as the code before posting format 5 wrote them, to test the upgrade.

Formats 3 and 4 (``records/search.py``'s module docstring before format 5): namespace
``<prefix><namespace>.search``; key ``P || V`` with ``P = HMAC(k_ns, "term:" || term)`` whole
(16 bytes), ``V || C = AES-SIV(k_siv, ["safehold/search/v1", ns, term], plaintext)`` with the
plaintext ``E(id)`` (format 4) or the id's UTF-8 text (format 3); ``k_ns`` and ``k_siv`` are
derived for that namespace exactly as format 5 derives them for its own. Only the prefix length
and the namespace differ from :class:`~safehold.records.search.PostingIndex`, so these classes
reuse its sealing and override the prefix (and, for format 3, the plaintext).
"""

from __future__ import annotations

from safehold.crypto.keyset import Keyset
from safehold.records.repository import PatientRepository
from safehold.records.search import OLD_PREFIX_LEN, PostingIndex, decode_id
from safehold.store.base import Row, Store

#: The markers the older code wrote (records/reindex.py).
MARKER = "search-index-format"


class Format4Index(PostingIndex):
    """Writes (and reads) format-4 posting rows in the old namespace (module docstring)."""

    def __init__(self, store: Store, keyset: Keyset, namespace: str) -> None:
        assert namespace.endswith(".search"), namespace
        super().__init__(store, keyset, namespace)

    def prefix(self, term: str) -> bytes:
        p = self._bi.index(self.ns, b"term:" + term.encode("utf-8"))
        assert len(p) == OLD_PREFIX_LEN
        return p

    def open(self, row: Row, term: str) -> str:
        """The id a row of this format seals under ``term`` (raises if it does not authenticate)."""
        return self.decode(self._siv.decrypt(row.key[OLD_PREFIX_LEN:] + row.value,
                                             [*self._ad, term.encode("utf-8")]))

    def decode(self, plain: bytes) -> str:
        return decode_id(plain)

    def lookup(self, term: str) -> set[str]:
        """What the older code's lookup answered: the rows under the term's 16-byte prefix
        (through ``scan_prefix`` over a FreshStore: the old namespace's groups are checked)."""
        scan_prefix = getattr(self.store, "scan_prefix", None)
        p = self.prefix(term)
        if scan_prefix is not None:
            rows = scan_prefix(self.ns, p)
        else:
            rows = [r for r in self.store.scan(self.ns, after=p, limit=10_000) if r.key[:OLD_PREFIX_LEN] == p]
        return {self.open(r, term) for r in rows}


class Format3Index(Format4Index):
    """Format 3: the id sealed as its UTF-8 text (a canonical UUID as 36 characters)."""

    def _row(self, term: str, plain: bytes) -> tuple[bytes, bytes]:
        return super()._row(term, decode_id(plain).encode("utf-8"))

    def decode(self, plain: bytes) -> str:
        return plain.decode("utf-8")


def write_with_old_index(repo: PatientRepository, fmt: int) -> Format4Index:
    """Make ``repo`` post in format ``fmt`` (3 or 4) into its old namespace, as the older code
    did; returns that index (``repo.index`` until the caller puts the real one back)."""
    cls = {3: Format3Index, 4: Format4Index}[fmt]
    old = cls(repo.engine.store, repo.index.keyset, repo.old_index_ns)
    repo.index = old
    return old


def write_old_marker(repo: PatientRepository, fmt: int) -> None:
    """The format marker the older code's rebuild wrote."""
    repo.committer.run(lambda: repo.engine.put(f"{repo.ns}.meta", MARKER,
                                               b"safehold/search-index/%d" % fmt))
