"""The key broker's audit log (:class:`BrokerAuditLog`): append-only, hash-chained, every entry
signed by the broker. (The records service keeps its own, differently built access log in
:mod:`safehold.records.audit`.)

Each entry is a JSON object ``{"seq", "time", "event", "detail", "prev"}`` where ``prev`` is the
hex SHA-256 of the previous entry's canonical JSON (64 zeros for entry 1). The entry's hash is
SHA-256 over its canonical JSON (RFC 8785 subset, :func:`~safehold.broker.protocol.canonical_json`)
and the broker signs that hash with its Ed25519 audit key (RFC 8032). A stored row is

    key   = seq as 8 bytes big-endian (so a scan returns entries in order)
    value = state envelope of canonical JSON {"entry": {...}, "hash": hex, "sig": base64url}

in its own store namespace; the envelope's associated data binds the namespace and seq, so a row
copied to another position fails authentication. A ``head`` row (latest seq and hash, signed)
lets :func:`verify_chain` notice entries cut off the end.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from safehold.broker.protocol import b64url, canonical_json, unb64url
from safehold.errors import AuditChainError, ConflictError, SafeholdError
from safehold.store.base import Store

_GENESIS = "0" * 64
_HEAD_KEY = b"\xff" * 8 + b"head"

#: (plaintext, associated data) → envelope bytes; and its inverse (raises on failure).
Sealer = Callable[[bytes, bytes], bytes]
Opener = Callable[[bytes, bytes], bytes]
#: How the broker's parts append an audit entry: ``record(event, detail)`` (never key material
#: or secret values in ``detail``).
Recorder = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class BrokerAuditEntry:
    """One verified audit entry.

    Attributes:
        seq: 1-based position. time: ISO 8601 UTC. event: e.g. ``attest``, ``release``,
        ``deny``, ``manifest``, ``recovery``. detail: JSON object. prev/hash: hex SHA-256.
    """

    seq: int
    time: str
    event: str
    detail: dict[str, Any]
    prev: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"seq": self.seq, "time": self.time, "event": self.event, "detail": self.detail,
                "prev": self.prev, "hash": self.hash}


def _aad(namespace: str, key: bytes) -> bytes:
    return b"safehold-broker-audit\x00" + namespace.encode() + b"\x00" + key


class BrokerAuditLog:
    """Append and read the audit log in one store namespace.

    Args:
        store: the broker's store. namespace: its audit namespace.
        seal / open_: state-envelope functions (see :data:`Sealer`).
        signing_key: the broker's Ed25519 audit key; None for a read/verify-only log.
    """

    def __init__(self, store: Store, namespace: str, seal: Sealer, open_: Opener,
                 signing_key: ed25519.Ed25519PrivateKey | None = None):
        self.store = store
        self.namespace = namespace
        self._seal = seal
        self._open = open_
        self._key = signing_key
        self._lock = threading.Lock()

    def append(self, event: str, detail: dict[str, Any]) -> BrokerAuditEntry:
        """Append one signed entry and move the head; both commit in one transaction.

        Raises:
            StoreError: the store failed; nothing was written.
            AuditChainError: the current head does not authenticate (tampered log).
        """
        if self._key is None:
            raise AuditChainError("audit log opened without a signing key; cannot append")
        with self._lock:
            for _ in range(20):  # another broker replica may append concurrently
                try:
                    return self._append_once(event, detail)
                except ConflictError:
                    continue
            raise AuditChainError("audit log: could not append after 20 concurrent conflicts")

    def _append_once(self, event: str, detail: dict[str, Any]) -> BrokerAuditEntry:
        assert self._key is not None
        head_row = self.store.get(self.namespace, _HEAD_KEY)
        if head_row is None:
            seq, prev, head_ver = 1, _GENESIS, 0
        else:
            last = self._open_json(head_row.value, _HEAD_KEY, "head")
            seq, prev, head_ver = int(last["seq"]) + 1, str(last["hash"]), head_row.version
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        entry = {"seq": seq, "time": now, "event": event, "detail": detail, "prev": prev}
        digest = hashlib.sha256(canonical_json(entry)).digest()
        sig = self._key.sign(digest)
        key = seq.to_bytes(8, "big")
        row = canonical_json({"entry": entry, "hash": digest.hex(), "sig": b64url(sig)})
        head_sig = self._key.sign(b"head" + seq.to_bytes(8, "big") + digest)
        head = canonical_json({"seq": seq, "hash": digest.hex(), "sig": b64url(head_sig)})
        with self.store.transaction() as tx:
            tx.put(self.namespace, key, self._seal(row, _aad(self.namespace, key)), expected_version=0)
            tx.put(self.namespace, _HEAD_KEY, self._seal(head, _aad(self.namespace, _HEAD_KEY)),
                   expected_version=head_ver)
        return BrokerAuditEntry(seq, now, event, detail, prev, digest.hex())

    def _open_json(self, blob: bytes, key: bytes, what: str) -> dict[str, Any]:
        try:
            return json.loads(self._open(blob, _aad(self.namespace, key)))
        except SafeholdError:
            raise AuditChainError(
                f"audit {what}: row fails authentication (edited in the database)"
            ) from None
        except ValueError:
            raise AuditChainError(f"audit {what}: not valid JSON") from None

    def entries(self) -> Iterator[BrokerAuditEntry]:
        """Yield every entry in order, verifying as it goes (see :func:`verify_chain`)."""
        yield from verify_chain(self, self._key.public_key() if self._key else None)


def verify_chain(log: BrokerAuditLog,
                 public_key: ed25519.Ed25519PublicKey | None) -> Iterator[BrokerAuditEntry]:
    """Yield the entries of ``log`` in order after checking each one.

    Checks per entry: the row authenticates, its seq is the next one (no gap, no reorder), its
    ``prev`` is the previous entry's hash, its hash is SHA-256 of its canonical JSON, and its
    Ed25519 signature verifies under ``public_key``. At the end, the signed head must name the
    last entry (entries cut off the end are noticed).

    Raises:
        AuditChainError: naming the first broken entry, e.g. ``audit entry #7: hash mismatch``.
    """
    expected_seq, prev = 1, _GENESIS
    for row in log.store.scan_all(log.namespace):
        if row.key == _HEAD_KEY:
            continue
        if len(row.key) != 8:
            raise AuditChainError(f"audit log: unexpected row key {row.key.hex()}")
        seq = int.from_bytes(row.key, "big")
        if seq != expected_seq:
            raise AuditChainError(f"audit entry #{expected_seq}: missing (next row is #{seq})")
        try:
            obj = json.loads(log._open(row.value, _aad(log.namespace, row.key)))
            entry, stored_hash, sig = obj["entry"], obj["hash"], unb64url(obj["sig"])
        except SafeholdError:
            raise AuditChainError(
                f"audit entry #{seq}: row fails authentication (edited in the database)"
            ) from None
        except (ValueError, KeyError, TypeError):
            raise AuditChainError(f"audit entry #{seq}: malformed") from None
        digest = hashlib.sha256(canonical_json(entry)).digest()
        if entry.get("seq") != seq:
            raise AuditChainError(f"audit entry #{seq}: seq field says {entry.get('seq')!r}")
        if entry.get("prev") != prev:
            raise AuditChainError(
                f"audit entry #{seq}: chain broken: prev expected {prev[:16]}…, "
                f"got {str(entry.get('prev'))[:16]}…"
            )
        if digest.hex() != stored_hash:
            raise AuditChainError(f"audit entry #{seq}: hash mismatch (entry content changed)")
        if public_key is not None:
            try:
                public_key.verify(sig, digest)
            except InvalidSignature:
                raise AuditChainError(f"audit entry #{seq}: broker signature does not verify") from None
        yield BrokerAuditEntry(seq, entry["time"], entry["event"], entry["detail"], entry["prev"],
                               stored_hash)
        prev, expected_seq = stored_hash, seq + 1
    head_row = log.store.get(log.namespace, _HEAD_KEY)
    last = expected_seq - 1
    if head_row is None:
        if last:
            raise AuditChainError("audit log: head row missing")
        return
    head = log._open_json(head_row.value, _HEAD_KEY, "head")
    if public_key is not None:
        try:
            public_key.verify(unb64url(head["sig"]), b"head" + int(head["seq"]).to_bytes(8, "big")
                              + bytes.fromhex(head["hash"]))
        except (InvalidSignature, ValueError, KeyError):
            raise AuditChainError("audit head: broker signature does not verify") from None
    if int(head["seq"]) != last or head["hash"] != (prev if last else head["hash"]):
        raise AuditChainError(
            f"audit entry #{last + 1}: missing (head says {head['seq']} entries, found {last})"
        )


def verify_log(log: BrokerAuditLog, public_key: ed25519.Ed25519PublicKey | None) -> int:
    """Verify the whole log; return the number of entries.

    Raises:
        AuditChainError: naming the first broken entry.
    """
    n = 0
    for _ in verify_chain(log, public_key):
        n += 1
    return n


def verify_manifest_history(log: BrokerAuditLog, public_key: ed25519.Ed25519PublicKey) -> tuple[int, int]:
    """Verify the whole log (:func:`verify_chain`) and that its ``manifest`` entries name strictly
    increasing versions.

    Returns:
        ``(number of entries, version of the last manifest entry or 0)``; the caller compares the
        latter with the state head.

    Raises:
        AuditChainError: naming the first broken entry, or the entry whose manifest version
            went backwards (manifest rows rolled back or replaced in the store).
    """
    n = last = 0
    for e in verify_chain(log, public_key):
        n += 1
        if e.event == "manifest":
            v = e.detail.get("version")
            if not isinstance(v, int) or v <= last:
                raise AuditChainError(
                    f"audit entry #{e.seq}: manifest version {v!r:.20} after version {last}: "
                    "the manifest went backwards (manifest rows rolled back or replaced in the store)"
                )
            last = v
    return n, last
