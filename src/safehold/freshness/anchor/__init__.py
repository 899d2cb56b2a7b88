"""The freshness anchor: a quorum of attested in-memory members holding ledger heads.

``base.py`` (interface, replies, majority rules), ``core.py`` (one member's rules),
``statements.py`` (endorsements, owner statements, checkpoints), ``wire.py`` (JSON API),
``http.py`` (routes), ``server.py`` (the member process), ``client.py`` (QuorumAnchor).
"""

from safehold.freshness.anchor.base import Anchor, AnchorHead, MemberInfo, MemberSignature

__all__ = ["Anchor", "AnchorHead", "MemberInfo", "MemberSignature"]
