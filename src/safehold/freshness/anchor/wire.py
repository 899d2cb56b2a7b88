"""JSON wire format of the anchor members' HTTP API, shared by the server (``anchor/http.py``) and
the client (``anchor/client.py``). Byte strings are lowercase hex (ids, digests) or base64url
without padding (keys, signatures).

* ``GET /v1/anchor/info`` (no client certificate needed): ``{member, public_key, endorsement,
  ready, lost_mode, members}``;
* ``GET /v1/anchor/state`` (none): ``{member, ready, lost_mode, ledgers: {name: {epoch,
  digest}}}`` — for a restarting peer;
* ``GET /v1/anchor/ledgers/{ledger}`` (none): reply, head signed by the member;
* ``POST /v1/anchor/advance/{ledger}`` (mutual TLS, the certificate's own ledger):
  ``{prev: head, new: head}`` → reply (not signed);
* ``POST /v1/anchor/owner`` (mutual TLS): ``{payload, signature}`` (an owner statement for the
  certificate's ledger) → reply.

reply = ``{status, head: {epoch, digest, signatures: [{member, public_key, signature}]} | null,
reason}``; status codes: 200 accepted/known, 404 unknown, 410 lost, 409 conflict, 403 refused,
503 not-ready, 400 malformed request, 401 no client certificate.
"""

from __future__ import annotations

from typing import Any

from safehold.freshness.anchor.base import AnchorHead, MemberInfo, MemberReply, MemberSignature
from safehold.freshness.anchor.core import PeerState
from safehold.freshness.anchor.statements import b64, unb64
from safehold.freshness.errors import FreshnessError, WireError

__all__ = ["WireError", "head_from", "head_to", "info_from", "info_to", "reply_from", "reply_to",
           "state_from", "state_to"]

STATUS_CODES = {"accepted": 200, "known": 200, "unknown": 404, "lost": 410, "conflict": 409,
                "refused": 403, "not-ready": 503}

def _hex(v: object, what: str, length: int | None = None) -> bytes:
    try:
        b = bytes.fromhex(v) if isinstance(v, str) else None
    except ValueError:
        b = None
    if b is None or (length is not None and len(b) != length):
        raise WireError(f"{what}: expected {length or 'some'} bytes as hex")
    return b


def _int(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
        raise WireError(f"{what}: expected an integer 0..2**63-1")
    return v


def head_to(h: AnchorHead) -> dict[str, Any]:
    """Wire form of a head."""
    return {"epoch": h.epoch, "digest": h.digest.hex(),
            "signatures": [{"member": s.member.hex(), "public_key": b64(s.public_key),
                            "signature": b64(s.signature)} for s in h.signatures]}


def head_from(obj: object, what: str = "head") -> AnchorHead:
    """Parse a head. Raises WireError."""
    if not isinstance(obj, dict):
        raise WireError(f"{what}: expected an object")
    sigs = obj.get("signatures", [])
    if not isinstance(sigs, list) or len(sigs) > 64:
        raise WireError(f"{what}.signatures: expected a list")
    out = []
    for s in sigs:
        if not isinstance(s, dict):
            raise WireError(f"{what}.signatures: expected objects")
        try:
            out.append(MemberSignature(_hex(s.get("member"), "member", 16),
                                       unb64(s.get("public_key"), "public_key"),
                                       unb64(s.get("signature"), "signature")))
        except FreshnessError as e:
            raise WireError(f"{what}.signatures: {e}") from None
    return AnchorHead(_int(obj.get("epoch"), f"{what}.epoch"), _hex(obj.get("digest"), f"{what}.digest", 32),
                      tuple(out))


def reply_to(r: MemberReply) -> dict[str, Any]:
    """Wire form of a member reply."""
    return {"status": r.status, "head": None if r.head is None else head_to(r.head), "reason": r.reason}


def reply_from(obj: object) -> MemberReply:
    """Parse a member reply. Raises WireError."""
    if not isinstance(obj, dict) or obj.get("status") not in STATUS_CODES:
        raise WireError("anchor reply: expected {status, head, reason} with a known status")
    head = obj.get("head")
    return MemberReply(str(obj["status"]), None if head is None else head_from(head),
                       str(obj.get("reason", ""))[:500])


def info_to(i: MemberInfo) -> dict[str, Any]:
    """Wire form of a member's self-description."""
    return {"member": i.member.hex(), "public_key": b64(i.public_key), "endorsement": b64(i.endorsement),
            "ready": i.ready, "lost_mode": i.lost_mode, "members": i.members}


def info_from(obj: object, certificate: bytes = b"") -> MemberInfo:
    """Parse a member's self-description. Raises WireError."""
    if not isinstance(obj, dict):
        raise WireError("anchor info: expected an object")
    try:
        return MemberInfo(_hex(obj.get("member"), "member", 16), unb64(obj.get("public_key"), "public_key"),
                          unb64(obj.get("endorsement"), "endorsement"), obj.get("ready") is True,
                          obj.get("lost_mode") is True, _int(obj.get("members"), "members"), certificate)
    except FreshnessError as e:
        raise WireError(f"anchor info: {e}") from None


def state_to(s: PeerState) -> dict[str, Any]:
    """Wire form of a member's state (for peers catching up)."""
    return {"member": s.member.hex(), "ready": s.ready, "lost_mode": s.lost_mode,
            "ledgers": {k: {"epoch": e, "digest": d.hex()} for k, (e, d) in s.ledgers.items()}}


def state_from(obj: object) -> PeerState:
    """Parse a member's state. Raises WireError."""
    if not isinstance(obj, dict) or not isinstance(obj.get("ledgers"), dict):
        raise WireError("anchor state: expected {member, ready, lost_mode, ledgers}")
    led = {}
    for k, v in obj["ledgers"].items():
        if not isinstance(v, dict):
            raise WireError("anchor state: ledgers must map to {epoch, digest}")
        led[str(k)] = (_int(v.get("epoch"), "epoch"), _hex(v.get("digest"), "digest", 32))
    return PeerState(_hex(obj.get("member"), "member", 16), obj.get("ready") is True,
                     obj.get("lost_mode") is True, led)
