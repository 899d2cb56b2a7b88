"""One anchor member: ledger heads in memory, the advance / read / owner-statement rules, and
catching up from peers after a restart. Framework-free (``anchor/http.py`` serves it).

State (memory only, never written anywhere): ledger → ``(epoch, digest)``; the incarnation id
(16 random bytes, new at every start); an Ed25519 statement key generated at start; the hashes
of owner statements applied in this incarnation.

Rules (Nimble's endorser, adapted; see docs/freshness.md):

* **writers**: only a certificate of the pinned workload CA whose extended key usage holds
  :data:`ATTESTED_WORKLOAD_EKU` writes, and only the ledger named by its CN (or ``<CN>/...``,
  :func:`ledger_writer`, :func:`may_write`). The broker sets that key purpose only where it
  issues to an attested key (KBS, after appraisal) and in its own ledger certificate; an admin
  client certificate (``/admin/client-certificates``, operators may ask for any CN) never has it.
* **advance(prev → new)** by the ledger's own workload: accepted if the member's head is
  ``prev`` (the normal case), already ``new`` (a retry), or older than ``prev`` (the member
  missed updates while a majority moved on); refused as a *conflict* otherwise — another head
  at or after ``prev`` means another writer (a fork). Unknown ledger: ``unknown`` (or ``lost``
  in lost mode); new ledgers need the owner.
* **owner statement**: signed by the pinned owner key, addressed to this incarnation, not
  applied before → the head is set (first initialisation, or re-anchoring after a loss).
* **catch-up** after a restart (the member comes up empty and serves nothing until then): if a
  majority of all members (``n // 2 + 1``), not counting itself, answer *ready*, take the
  highest head per ledger — every head a majority accepted is among them. If instead a majority
  of all members (counting itself) have no state (restarting), the anchor has lost its heads:
  the member becomes ready in *lost mode*, where every ledger it does not hold reads ``lost``
  and only an owner statement brings a ledger back. A ledger that any ready peer reports lost
  stays lost.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from safehold.freshness.anchor.base import (
    ACCEPTED,
    CONFLICT,
    KNOWN,
    LOST,
    NOT_READY,
    REFUSED,
    UNKNOWN,
    AnchorHead,
    MemberInfo,
    MemberReply,
    MemberSignature,
    head_message,
    majority,
)
from safehold.freshness.anchor.statements import SignedOwnerStatement
from safehold.freshness.errors import OwnerStatementError

__all__ = ["ATTESTED_WORKLOAD_EKU", "MemberCore", "PeerState", "ledger_writer", "may_write"]

#: KeyPurposeId (RFC 5280 §4.2.1.12) "key of a workload the broker appraised": the broker's
#: workload CA adds it only to certificates for attested keys (``broker/kbs.py``, after
#: appraisal) and to the broker's own ledger certificate (``broker/fresh.py``), never to an admin
#: client certificate. An OID under the UUID arc 2.25 (ITU-T X.667 §6.3: no registration).
ATTESTED_WORKLOAD_EKU = x509.ObjectIdentifier("2.25.174023684761916736850894902947829561031")


def ledger_writer(cert: x509.Certificate) -> str | None:
    """The workload name ``cert`` may write ledgers as, or None.

    ``cert`` already chains to the pinned workload CA (the TLS layer checked it). Its subject CN
    counts only if its ExtendedKeyUsage holds :data:`ATTESTED_WORKLOAD_EKU`: the same CA issues
    operators client certificates with any CN, and those must grant nothing here.
    """
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (x509.ExtensionNotFound, ValueError):
        return None
    if ATTESTED_WORKLOAD_EKU not in eku or len(names) != 1 or not isinstance(names[0].value, str):
        return None
    return names[0].value or None


def may_write(client: str | None, ledger: str) -> bool:
    """A client may write the ledger named like its workload certificate, or ``<name>/...``."""
    return bool(client) and (ledger == client or ledger.startswith(f"{client}/"))


@dataclass(frozen=True)
class PeerState:
    """A member's full state, as a restarting peer reads it (``GET /v1/anchor/state``).

    Attributes:
        member: incarnation id. ready: serving. lost_mode: see the module docstring.
        ledgers: ledger → (epoch, digest).
    """

    member: bytes
    ready: bool
    lost_mode: bool
    ledgers: dict[str, tuple[int, bytes]] = field(default_factory=dict)


class MemberCore:
    """See the module docstring.

    Args:
        members: n, the number of members in the anchor (from the measured configuration).
        owner_key: the pinned owner public key (Ed25519 or ECDSA).
        tls_key: the member's RA-TLS private key (endorses the statement key); None in tests of
            the core alone.
    """

    def __init__(self, members: int, owner_key: object, *,
                 tls_key: ec.EllipticCurvePrivateKey | None = None) -> None:
        if members < 1:
            raise ValueError("an anchor needs at least one member")
        self.n = members
        self.owner_key = owner_key
        self.member = os.urandom(16)
        self._sk = ed25519.Ed25519PrivateKey.generate()
        self.public_key = self._sk.public_key().public_bytes(serialization.Encoding.Raw,
                                                              serialization.PublicFormat.Raw)
        self.endorsement = b""
        if tls_key is not None:
            from cryptography.hazmat.primitives import hashes

            from safehold.freshness.anchor.statements import endorsement_message

            self.endorsement = tls_key.sign(endorsement_message(self.member, self.public_key),
                                            ec.ECDSA(hashes.SHA384()))
        self.ready = members == 1  # a one-member anchor has nobody to catch up from
        self.lost_mode = members == 1
        self._ledgers: dict[str, tuple[int, bytes]] = {}
        self._applied: set[bytes] = set()
        self._lock = threading.Lock()
        # ledger -> the last signed head: Ed25519 is deterministic (RFC 8032 §5.1.6), so a head
        # read between two advances returns the same bytes without signing again; an entry is
        # used only while (epoch, digest) is still the ledger's head (the key of the message)
        self._sigs: dict[str, AnchorHead] = {}

    # -- helpers ----------------------------------------------------------------------------

    def _signed(self, ledger: str, epoch: int, digest: bytes) -> AnchorHead:
        last = self._sigs.get(ledger)
        if last is not None and last.epoch == epoch and last.digest == digest:
            return last
        sig = self._sk.sign(head_message(ledger, epoch, digest, self.member))
        head = AnchorHead(epoch, digest, (MemberSignature(self.member, self.public_key, sig),))
        self._sigs[ledger] = head
        return head

    def _current(self, ledger: str) -> MemberReply | None:
        cur = self._ledgers.get(ledger)
        if cur is None:
            return MemberReply(LOST if self.lost_mode else UNKNOWN)
        return None

    def info(self) -> MemberInfo:
        """This member's self-description."""
        return MemberInfo(self.member, self.public_key, self.endorsement, self.ready, self.lost_mode, self.n)

    # -- operations ---------------------------------------------------------------------------

    def read(self, ledger: str) -> MemberReply:
        """The member's head of ``ledger`` (``known`` with a signature, ``unknown``, ``lost``)."""
        with self._lock:
            if not self.ready:
                return MemberReply(NOT_READY, reason="catching up with peers")
            missing = self._current(ledger)
            if missing is not None:
                return missing
            e, d = self._ledgers[ledger]
        return MemberReply(KNOWN, self._signed(ledger, e, d))

    def advance(self, ledger: str, prev: AnchorHead, new: AnchorHead, *, client: str | None) -> MemberReply:
        """Apply the advance rule (module docstring) for the authenticated ``client``."""
        if not may_write(client, ledger):
            return MemberReply(REFUSED, reason=f"client {client!r} may not write ledger {ledger!r}")
        if new.epoch <= prev.epoch or len(new.digest) != 32:
            return MemberReply(REFUSED, reason="the new head must have a higher epoch and a 32-byte digest")
        with self._lock:
            if not self.ready:
                return MemberReply(NOT_READY, reason="catching up with peers")
            missing = self._current(ledger)
            if missing is not None:
                return missing
            e, d = self._ledgers[ledger]
            if (e, d) == (new.epoch, new.digest) or (e, d) == (prev.epoch, prev.digest) or e < prev.epoch:
                self._ledgers[ledger] = (new.epoch, new.digest)
                status, head = ACCEPTED, (new.epoch, new.digest)
            else:
                status, head = CONFLICT, (e, d)
        reason = "" if status == ACCEPTED else (
            f"member holds epoch {head[0]}, not {prev.epoch} or {new.epoch}")
        # not signed: the attested channel authenticates the answer, and an Ed25519 signature per
        # advance would cost every member ~70 µs on the commit path; reads are signed
        return MemberReply(status, AnchorHead(*head), reason)

    def apply_owner(self, signed: SignedOwnerStatement, *, client: str | None) -> MemberReply:
        """Apply an owner statement (module docstring) forwarded by ``client``."""
        st = signed.statement
        if not may_write(client, st.ledger):
            return MemberReply(REFUSED, reason=f"client {client!r} may not write ledger {st.ledger!r}")
        try:
            signed.verify(self.owner_key)
        except OwnerStatementError as e:
            return MemberReply(REFUSED, reason=str(e))
        if self.member not in st.members:
            return MemberReply(REFUSED, reason="statement is not addressed to this member incarnation "
                               f"({self.member.hex()}); it was signed for members before a restart")
        h = hashlib.sha256(st.payload()).digest()
        with self._lock:
            if not self.ready:
                return MemberReply(NOT_READY, reason="catching up with peers")
            if h in self._applied:
                if self._ledgers.get(st.ledger) != (st.epoch, st.digest):
                    return MemberReply(REFUSED, reason="owner statement replayed")
            else:
                self._applied.add(h)
                self._ledgers[st.ledger] = (st.epoch, st.digest)
        return MemberReply(ACCEPTED, self._signed(st.ledger, st.epoch, st.digest))

    # -- peers --------------------------------------------------------------------------------

    def dump(self) -> PeerState:
        """This member's state for a restarting peer."""
        with self._lock:
            return PeerState(self.member, self.ready, self.lost_mode, dict(self._ledgers))

    def catch_up(self, peers: Sequence[PeerState | None]) -> bool:
        """Try to become ready from the other members' states (None = unreachable); True once ready.

        Peers reporting this member's own incarnation are ignored (a misconfigured member list).
        """
        with self._lock:
            if self.ready:
                return True
            others = [p for p in peers if p is not None and p.member != self.member]
            ready = [p for p in others if p.ready]
            q = majority(self.n)
            if len(ready) >= q:
                names = {name for p in ready for name in p.ledgers}
                for name in names:
                    if any(p.lost_mode and name not in p.ledgers for p in ready):
                        continue  # lost at a peer: stays lost here
                    heads = [p.ledgers[name] for p in ready if name in p.ledgers]
                    top = max(e for e, _ in heads)
                    digests = {d for e, d in heads if e == top}
                    if len(digests) == 1:
                        self._ledgers[name] = (top, digests.pop())
                self.lost_mode = any(p.lost_mode for p in ready) or len(
                    [n for n in names if n not in self._ledgers]) > 0
                self.ready = True
            elif len(others) - len(ready) + 1 >= q:
                self.lost_mode = True
                self.ready = True
            return self.ready
