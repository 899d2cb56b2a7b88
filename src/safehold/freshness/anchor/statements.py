"""Signed statements around the anchor: member endorsements, member head signatures, the data
owner's initialise / re-anchor statement and the owner checkpoint.

* **Endorsement**: a member's RA-TLS key (ECDSA P-384, generated in the TEE, bound to its
  Evidence) signs ``"safehold/anchor/statement-key/v1" || 0x00 || incarnation || ed25519_pub``
  (ECDSA with SHA-384, FIPS 186-5), so the Ed25519 key that signs heads speaks for the attested
  member. Ed25519 (RFC 8032) signs every head: it is ~30x cheaper than P-384.
* **Owner statement**: canonical JSON (sorted keys, no spaces) with ``type =
  "safehold-anchor-owner-statement/v1"``, the ledger, the head to set, the incarnation ids of
  the members it addresses, the issue time and what the owner was shown (``summary``). Signed
  by the owner key pinned in every member's measured configuration: Ed25519 over the bytes, or
  ECDSA P-256/P-384 with SHA-256 (DER), as manifest updates (``broker/manifest.py``). A member
  applies it only if its own incarnation id is listed and it has not applied it before, so a
  statement cannot be replayed after a restart or twice.
* **Checkpoint**: the latest anchor head the owner has seen, with the members' signatures,
  their RA-TLS certificates and endorsements — enough for an offline check. Re-anchoring
  refuses a head older than the owner's checkpoint unless the owner accepts the rollback.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from safehold.freshness.anchor.base import AnchorHead, MemberSignature, head_message
from safehold.freshness.errors import OwnerStatementError, StoreForkedError, StoreRolledBackError

__all__ = ["STATEMENT_TYPE", "AnchorCheckpoint", "OwnerStatement", "SignedOwnerStatement",
           "check_against_checkpoint", "endorsement_message", "load_owner_public_key",
           "sign_owner_statement", "verify_endorsement", "verify_head_signatures"]

STATEMENT_TYPE = "safehold-anchor-owner-statement/v1"
CHECKPOINT_TYPE = "safehold-anchor-checkpoint/v1"
_ENDORSE = b"safehold/anchor/statement-key/v1\x00"
ACTIONS = ("initialise", "reanchor")


def b64(b: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def unb64(s: object, what: str) -> bytes:
    """Inverse of :func:`b64`. Raises OwnerStatementError naming ``what``."""
    if not isinstance(s, str):
        raise OwnerStatementError(f"{what}: expected a base64url string")
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except ValueError:
        raise OwnerStatementError(f"{what}: not base64url") from None


def endorsement_message(member: bytes, public_key: bytes) -> bytes:
    """What a member's RA-TLS key signs to endorse its Ed25519 statement key."""
    return _ENDORSE + member + public_key


def verify_endorsement(tls_public_key: object, member: bytes, public_key: bytes, endorsement: bytes) -> bool:
    """True if ``endorsement`` is the RA-TLS key's ECDSA/SHA-384 signature over the statement key."""
    if not isinstance(tls_public_key, ec.EllipticCurvePublicKey):
        return False
    try:
        tls_public_key.verify(endorsement, endorsement_message(member, public_key), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


def verify_head_signatures(ledger: str, head: AnchorHead,
                           trusted: Mapping[bytes, bytes] | None = None) -> int:
    """Count the valid member signatures on ``head``.

    Args:
        trusted: incarnation id → statement key accepted (from attested members); None accepts
            the key carried in each signature (then only the signature itself is checked).

    Returns:
        the number of distinct members whose signature verifies.
    """
    good = set()
    for s in head.signatures:
        key = s.public_key if trusted is None else trusted.get(s.member)
        if key is None or key != s.public_key:
            continue
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(key).verify(
                s.signature, head_message(ledger, head.epoch, head.digest, s.member))
        except (InvalidSignature, ValueError):
            continue
        good.add(s.member)
    return len(good)


@dataclass(frozen=True)
class OwnerStatement:
    """The data owner's instruction to set a ledger's head (see the module docstring).

    Attributes:
        action: ``initialise`` (first start) or ``reanchor`` (after the anchor lost the ledger,
            or to accept a store the owner knowingly restored).
        ledger: ledger name. epoch / digest: the head to set.
        members: incarnation ids of the members addressed (a majority must apply it).
        issued_at: Unix seconds. summary: what the owner was shown (rows, last entry time, ...).
    """

    action: str
    ledger: str
    epoch: int
    digest: bytes
    members: tuple[bytes, ...]
    issued_at: int = field(default_factory=lambda: int(time.time()))
    summary: Mapping[str, Any] = field(default_factory=dict)

    def payload(self) -> bytes:
        """The canonical bytes the owner signs."""
        if self.action not in ACTIONS:
            raise OwnerStatementError(
                f"owner statement: action must be one of {ACTIONS}, got {self.action!r}")
        return json.dumps({
            "type": STATEMENT_TYPE, "action": self.action, "ledger": self.ledger, "epoch": self.epoch,
            "digest": self.digest.hex(), "members": sorted(m.hex() for m in self.members),
            "issued_at": self.issued_at, "summary": dict(self.summary),
        }, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def head(self) -> AnchorHead:
        """The head this statement sets."""
        return AnchorHead(self.epoch, self.digest)


@dataclass(frozen=True)
class SignedOwnerStatement:
    """An :class:`OwnerStatement` and the owner's signature over its payload."""

    statement: OwnerStatement
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        """Wire form: ``{"payload": base64url, "signature": base64url}``."""
        return {"payload": b64(self.statement.payload()), "signature": b64(self.signature)}

    @classmethod
    def from_json(cls, obj: object) -> SignedOwnerStatement:
        """Parse the wire form. Raises OwnerStatementError on any malformed field."""
        if not isinstance(obj, dict) or set(obj) != {"payload", "signature"}:
            raise OwnerStatementError('owner statement: expected {"payload", "signature"}')
        raw = unb64(obj["payload"], "owner statement payload")
        sig = unb64(obj["signature"], "owner statement signature")
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or d.get("type") != STATEMENT_TYPE:
                raise ValueError("type")
            st = OwnerStatement(
                action=str(d["action"]), ledger=str(d["ledger"]), epoch=int(d["epoch"]),
                digest=bytes.fromhex(d["digest"]), members=tuple(bytes.fromhex(m) for m in d["members"]),
                issued_at=int(d["issued_at"]), summary=dict(d["summary"]))
        except (ValueError, KeyError, TypeError) as e:
            raise OwnerStatementError(f"owner statement payload is malformed ({e})") from None
        if st.payload() != raw or len(st.digest) != 32 or st.epoch < 0:
            raise OwnerStatementError("owner statement payload is not in canonical form")
        return cls(st, sig)

    def verify(self, owner_public_key: object) -> None:
        """Check the signature with the pinned owner key.

        Raises:
            OwnerStatementError: wrong key type or the signature does not verify.
        """
        payload = self.statement.payload()
        try:
            if isinstance(owner_public_key, ed25519.Ed25519PublicKey):
                owner_public_key.verify(self.signature, payload)
            elif isinstance(owner_public_key, ec.EllipticCurvePublicKey):
                owner_public_key.verify(self.signature, payload, ec.ECDSA(hashes.SHA256()))
            else:
                raise OwnerStatementError("owner key must be Ed25519 or ECDSA")
        except InvalidSignature:
            raise OwnerStatementError(
                f"owner statement for ledger {self.statement.ledger!r} is not signed by the pinned "
                "owner key") from None


def load_owner_public_key(pem: str | bytes) -> ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey:
    """Load the owner's SubjectPublicKeyInfo PEM (Ed25519 or ECDSA P-256/P-384).

    Raises:
        OwnerStatementError: not a PEM public key of those types.
    """
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii") if isinstance(pem, str) else pem)
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        raise OwnerStatementError(f"owner public key is not a PEM public key ({e})") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1", "secp384r1"):
        return key
    raise OwnerStatementError(
        f"owner public key must be Ed25519 or ECDSA P-256/P-384, got {type(key).__name__}")


def sign_owner_statement(statement: OwnerStatement, private_key_pem: bytes) -> SignedOwnerStatement:
    """Sign ``statement`` with the owner's private key (PKCS#8 PEM, unencrypted; held by the
    owner's CLI on a trusted device, never by a service).

    Raises:
        OwnerStatementError: the key does not load or is not Ed25519 / ECDSA.
    """
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise OwnerStatementError(f"owner private key does not load ({type(e).__name__})") from None
    payload = statement.payload()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return SignedOwnerStatement(statement, key.sign(payload))
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return SignedOwnerStatement(statement, key.sign(payload, ec.ECDSA(hashes.SHA256())))
    raise OwnerStatementError(f"owner key must be Ed25519 or ECDSA, got {type(key).__name__}")


@dataclass(frozen=True)
class AnchorCheckpoint:
    """The latest anchor head the owner has seen (kept by the owner's CLI on a trusted device).

    Attributes:
        ledger, head: the ledger and its head with the members' signatures.
        members: incarnation id → ``(RA-TLS certificate DER, endorsement)`` of each signer, so
            an auditor can re-appraise the Evidence and follow key → statement key → signature.
        taken_at: Unix seconds.
    """

    ledger: str
    head: AnchorHead
    members: Mapping[bytes, tuple[bytes, bytes]] = field(default_factory=dict)
    taken_at: int = field(default_factory=lambda: int(time.time()))

    def to_json(self) -> dict[str, Any]:
        """JSON form (``type = safehold-anchor-checkpoint/v1``)."""
        return {
            "type": CHECKPOINT_TYPE, "ledger": self.ledger, "epoch": self.head.epoch,
            "digest": self.head.digest.hex(), "taken_at": self.taken_at,
            "signatures": [{"member": s.member.hex(), "public_key": b64(s.public_key),
                            "signature": b64(s.signature)} for s in self.head.signatures],
            "members": {m.hex(): {"certificate": b64(c), "endorsement": b64(e)}
                        for m, (c, e) in self.members.items()},
        }

    @classmethod
    def from_json(cls, obj: object) -> AnchorCheckpoint:
        """Parse :meth:`to_json` output. Raises OwnerStatementError when malformed."""
        try:
            if not isinstance(obj, dict) or obj.get("type") != CHECKPOINT_TYPE:
                raise ValueError("type")
            sigs = tuple(MemberSignature(bytes.fromhex(s["member"]), unb64(s["public_key"], "public_key"),
                                         unb64(s["signature"], "signature")) for s in obj["signatures"])
            mem = {bytes.fromhex(k): (unb64(v["certificate"], "certificate"),
                                      unb64(v["endorsement"], "endorsement"))
                   for k, v in obj["members"].items()}
            return cls(str(obj["ledger"]), AnchorHead(int(obj["epoch"]), bytes.fromhex(obj["digest"]), sigs),
                       mem, int(obj["taken_at"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise OwnerStatementError(f"anchor checkpoint is malformed ({e})") from None


def check_against_checkpoint(ledger: str, candidate: AnchorHead, checkpoint: AnchorCheckpoint | None,
                             *, accept_rollback: bool = False, min_signatures: int = 1) -> None:
    """Refuse re-anchoring ``candidate`` if it is older than, or forks from, the checkpoint.

    Args:
        min_signatures: valid member signatures the checkpoint must carry to count.
        accept_rollback: the owner explicitly accepts a head older than the checkpoint.

    Raises:
        OwnerStatementError: the checkpoint is for another ledger or not signed enough.
        StoreRolledBackError: ``candidate.epoch`` < the checkpoint's (unless accepted).
        StoreForkedError: same epoch, another digest (never accepted).
    """
    if checkpoint is None:
        return
    if checkpoint.ledger != ledger:
        raise OwnerStatementError(f"checkpoint is for ledger {checkpoint.ledger!r}, not {ledger!r}")
    if verify_head_signatures(ledger, checkpoint.head) < min_signatures:
        raise OwnerStatementError("checkpoint does not carry enough valid member signatures")
    cp = checkpoint.head
    if candidate.epoch == cp.epoch and candidate.digest != cp.digest:
        raise StoreForkedError(
            f"ledger {ledger!r}: the store's head {candidate.describe()} differs from the owner's "
            f"checkpoint at the same epoch ({cp.describe()}): another history", ledger=ledger,
            store_epoch=candidate.epoch, anchor_epoch=cp.epoch)
    if candidate.epoch < cp.epoch and not accept_rollback:
        raise StoreRolledBackError(
            f"ledger {ledger!r}: the store's head is epoch {candidate.epoch}, older than the owner's "
            f"checkpoint (epoch {cp.epoch}, taken "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(checkpoint.taken_at))}); "
            "re-anchoring it would accept a rollback (the owner may accept it explicitly)",
            ledger=ledger, store_epoch=candidate.epoch, anchor_epoch=cp.epoch)


def signatures_json(sigs: Sequence[MemberSignature]) -> list[dict[str, str]]:
    """Wire form of member signatures."""
    return [{"member": s.member.hex(), "public_key": b64(s.public_key), "signature": b64(s.signature)}
            for s in sigs]
