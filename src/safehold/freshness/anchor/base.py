"""The anchor interface, the member replies and the majority rules every anchor client applies.

An *anchor* holds, per ledger, the latest ``(epoch, digest)`` of a store's journal hash chain,
where the operator cannot reset it: a quorum of ``n`` attested TEE members holding the heads in
memory only (Nimble's endorsers, OSDI 2023 §4; SVR2's in-memory replicas). A head is accepted
when a majority (``n // 2 + 1``) of members agree, so losing a minority changes nothing.

The same rules (:func:`combine_head`, :func:`combine_advance`, :func:`combine_owner`) are used
by :class:`~safehold.freshness.anchor.client.QuorumAnchor` (members as processes over RA-TLS)
and by the in-process test double of the test suite.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from safehold.freshness.errors import AnchorConflictError, AnchorLostError, AnchorUnavailableError

if TYPE_CHECKING:
    from safehold.freshness.anchor.statements import SignedOwnerStatement

__all__ = ["KNOWN", "LOST", "NOT_READY", "UNKNOWN", "Anchor", "AnchorHead", "MemberInfo",
           "MemberReply", "MemberSignature", "combine_advance", "combine_head", "combine_owner",
           "head_message", "majority"]

#: Member reply statuses.
KNOWN, UNKNOWN, LOST, NOT_READY = "known", "unknown", "lost", "not-ready"
ACCEPTED, CONFLICT, REFUSED = "accepted", "conflict", "refused"
_HEAD_MSG = b"safehold/anchor/head/v1\x00"


def majority(n: int) -> int:
    """Members needed for a quorum of ``n``: ``n // 2 + 1``."""
    return n // 2 + 1


def head_message(ledger: str, epoch: int, digest: bytes, member: bytes) -> bytes:
    """The bytes a member signs for a head: domain, ledger, epoch, digest, its incarnation id."""
    led = ledger.encode("ascii")
    return _HEAD_MSG + bytes((len(led),)) + led + struct.pack(">Q", epoch) + digest + member


@dataclass(frozen=True)
class MemberSignature:
    """One member's Ed25519 signature (RFC 8032) over :func:`head_message`.

    Attributes:
        member: the member's incarnation id (16 random bytes, new at every start).
        public_key: the member's Ed25519 statement key (32 bytes raw), endorsed by its RA-TLS
            key (see :mod:`safehold.freshness.anchor.statements`).
        signature: 64 bytes.
    """

    member: bytes
    public_key: bytes
    signature: bytes


@dataclass(frozen=True)
class AnchorHead:
    """A ledger head: epoch and chain digest (32 bytes), with the signatures of the members that
    hold it (empty for a head the store computed itself)."""

    epoch: int
    digest: bytes
    signatures: tuple[MemberSignature, ...] = ()

    def same(self, other: AnchorHead | None) -> bool:
        """Same epoch and digest (signatures aside)."""
        return other is not None and self.epoch == other.epoch and self.digest == other.digest

    def describe(self) -> str:
        """``epoch 12 (digest 3fa1…)`` for messages."""
        return f"epoch {self.epoch} (digest {self.digest.hex()[:16]}…)"


@dataclass(frozen=True)
class MemberInfo:
    """What a member says about itself (``GET /v1/anchor/info``).

    Attributes:
        member: incarnation id. public_key: Ed25519 statement key. endorsement: the RA-TLS key's
        ECDSA signature over the statement key (:func:`~safehold.freshness.anchor.statements.
        endorsement_message`). ready: caught up and serving. lost_mode: started while a
        majority had lost its state (its unknown ledgers read as lost). members: n.
        certificate: the member's RA-TLS certificate (DER) as seen on the connection.
    """

    member: bytes
    public_key: bytes
    endorsement: bytes
    ready: bool
    lost_mode: bool
    members: int
    certificate: bytes = b""


@dataclass(frozen=True)
class MemberReply:
    """One member's answer about one ledger.

    Attributes:
        status: for reads :data:`KNOWN`, :data:`UNKNOWN`, :data:`LOST`, :data:`NOT_READY`; for
            writes also ``accepted``, ``conflict``, ``refused`` (bad owner statement / not this
            client's ledger).
        head: the member's head after the call (with its one signature), when it has one.
        reason: a short explanation for refusals.
    """

    status: str
    head: AnchorHead | None = None
    reason: str = ""


class Anchor(Protocol):
    """What a :class:`~safehold.freshness.store.FreshStore` needs from an anchor."""

    def head(self, ledger: str) -> AnchorHead | None:
        """Majority read; the head with the highest epoch, or None if the ledger is unknown.

        Raises:
            AnchorLostError: a member of the read quorum lost its state for the ledger.
            AnchorUnavailableError: fewer than a majority answered.
            AnchorConflictError: two different heads at the highest epoch (two writers).
        """

    def advance(self, ledger: str, prev: AnchorHead, new: AnchorHead) -> AnchorHead:
        """Move the ledger from ``prev`` to ``new`` (``new.epoch > prev.epoch``) on a majority.
        Idempotent: repeating a call that partly succeeded completes it. The result carries no
        member signatures (read the head for a signed statement).

        Raises:
            AnchorUnavailableError, AnchorConflictError, AnchorLostError.
        """

    def initialise(self, statement: SignedOwnerStatement) -> AnchorHead:
        """Set a ledger's head from the data owner's signed statement (first initialisation or
        re-anchoring). Raises AnchorUnavailableError, OwnerStatementError."""

    def members(self) -> list[MemberInfo]:
        """The reachable members' self-descriptions (an owner statement addresses their
        incarnation ids). Raises AnchorUnavailableError if fewer than a majority answer."""


def _usable(replies: Sequence[MemberReply | BaseException]) -> list[MemberReply]:
    return [r for r in replies if isinstance(r, MemberReply) and r.status != NOT_READY]


def _why(replies: Sequence[MemberReply | BaseException]) -> str:
    parts = []
    for r in replies:
        parts.append(f"{type(r).__name__}: {r}" if isinstance(r, BaseException)
                     else r.status + (f" ({r.reason})" if r.reason else ""))
    return "; ".join(parts)[:600]


def combine_head(ledger: str, replies: Sequence[MemberReply | BaseException], n: int) -> AnchorHead | None:
    """The quorum's head from the members' read replies (see :meth:`Anchor.head`)."""
    ok = _usable(replies)
    q = majority(n)
    if len(ok) < q:
        raise AnchorUnavailableError(
            f"anchor: {len(ok)} of {n} members answered for ledger {ledger!r}, {q} needed: {_why(replies)}")
    if any(r.status == LOST for r in ok):
        raise AnchorLostError(
            f"anchor lost the head of ledger {ledger!r}: a majority of its members restarted at "
            "once, so no member can vouch for the latest state; the data owner must re-anchor",
            ledger=ledger)
    known = [r.head for r in ok if r.status == KNOWN and r.head is not None]
    if not known:
        return None
    top = max(h.epoch for h in known)
    tops = [h for h in known if h.epoch == top]
    if any(h.digest != tops[0].digest for h in tops):
        raise AnchorConflictError(
            f"anchor: members hold two different heads of ledger {ledger!r} at epoch {top}: two "
            "writers advanced the same ledger (a fork); the data owner must re-anchor")
    return AnchorHead(top, tops[0].digest, tuple(s for h in tops for s in h.signatures))


def combine_advance(ledger: str, new: AnchorHead, replies: Sequence[MemberReply | BaseException],
                    n: int) -> AnchorHead:
    """The result of an advance to ``new`` (see :meth:`Anchor.advance`)."""
    q = majority(n)
    acc = [r for r in replies if isinstance(r, MemberReply) and r.status == ACCEPTED]
    if len(acc) >= q:
        return AnchorHead(new.epoch, new.digest,
                          tuple(s for r in acc if r.head is not None for s in r.head.signatures))
    final = [r for r in replies
             if isinstance(r, MemberReply) and r.status in (CONFLICT, LOST, UNKNOWN, REFUSED)]
    if len(final) > n - q:  # a majority can no longer accept this advance
        if sum(r.status in (LOST, UNKNOWN) for r in final) > n - q:
            raise AnchorLostError(
                f"anchor: a majority of members do not hold ledger {ledger!r} (lost or never "
                f"initialised): {_why(replies)}", ledger=ledger, anchor_epoch=None)
        raise AnchorConflictError(
            f"anchor refused advancing ledger {ledger!r} to {new.describe()}: {_why(replies)}")
    raise AnchorUnavailableError(
        f"anchor: {len(acc)} of {n} members accepted advancing ledger {ledger!r} to epoch {new.epoch}, "
        f"{q} needed: {_why(replies)}")


def combine_owner(ledger: str, new: AnchorHead, replies: Sequence[MemberReply | BaseException],
                  n: int) -> AnchorHead:
    """The result of applying an owner statement (same majority rule as an advance)."""
    from safehold.freshness.errors import OwnerStatementError

    q = majority(n)
    acc = [r for r in replies if isinstance(r, MemberReply) and r.status == ACCEPTED]
    if len(acc) >= q:
        return AnchorHead(new.epoch, new.digest,
                          tuple(s for r in acc if r.head is not None for s in r.head.signatures))
    refused = [r for r in replies if isinstance(r, MemberReply) and r.status == REFUSED]
    if len(refused) > n - q:
        raise OwnerStatementError(f"anchor members refused the owner statement for ledger {ledger!r}: "
                                  f"{_why(replies)}")
    raise AnchorUnavailableError(
        f"anchor: {len(acc)} of {n} members applied the owner statement for ledger {ledger!r}, "
        f"{q} needed: {_why(replies)}")
