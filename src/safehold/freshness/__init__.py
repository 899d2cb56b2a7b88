"""Freshness: detect rollback, omission and forks of the untrusted database (issue 12).

* :class:`~safehold.freshness.store.FreshStore` wraps any :class:`~safehold.store.base.Store`
  and checks every read against an in-memory verifier map; every transaction is committed
  store-then-anchor (one journal entry, one anchor advance).
* :mod:`safehold.freshness.anchor`: the trusted anchor — ``n`` attested in-memory member
  processes (``anchor/server.py``) and :class:`~safehold.freshness.anchor.client.QuorumAnchor`.

Design, what is and is not detected, recovery: docs/freshness.md.
"""

from safehold.freshness.store import FreshStore
from safehold.freshness.vmap import NamespacePolicy

__all__ = ["FreshStore", "NamespacePolicy"]
