"""The SVR service facade: what the HTTP layer calls. Framework-free.

One service = one SVR server = one attested workload. It holds both protocols:

* SVR2 (:mod:`safehold.svr.svr2`): the whole backup on this server (Signal's SVR2, one
  replica group there, one TEE here);
* SVR3 (:mod:`safehold.svr.svr3`): this server's shares of a backup split across ``n`` servers
  after Signal's DB4 (:mod:`safehold.svr.db4`).

State: a records engine (AES-256-GCM rows, blind-indexed keys; :mod:`safehold.records.engine`)
over a :class:`~safehold.freshness.store.FreshStore` (ledger = the server's name) over the
untrusted store. Until the FreshStore is fresh (first start: the owner initialises the ledger;
after a restore from an older copy: refused) every protocol operation raises the freshness
finding and the HTTP layer answers 503.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from safehold.crypto import oprf
from safehold.freshness.anchor.base import Anchor, AnchorHead
from safehold.freshness.anchor.statements import SignedOwnerStatement
from safehold.freshness.errors import AnchorUnavailableError
from safehold.freshness.store import FreshStore
from safehold.records.engine import RecordEngine
from safehold.store import Store
from safehold.svr import svr2, svr3
from safehold.svr.errors import SvrConfigError
from safehold.svr.keys import SvrKeys
from safehold.svr.protocol import MAX_SECRET, MAX_TRIES, MIN_TRIES
from safehold.svr.rows import BackupTable, Svr2Row, Svr3Row

__all__ = ["NAME_RE", "SvrService"]

log = logging.getLogger("safehold.svr")
#: Server names double as freshness ledger names (and the anchor client certificate's CN).
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
ENGINE_PREFIX = "svr:"


class SvrService:
    """Both protocols over one verified store.

    Args:
        store: the untrusted store (SQLite or PostgreSQL engine), opened by the caller; closed
            by :meth:`close`.
        keys: from the secret the broker releases (for now: the process's standard input).
        name: this server's name (ledger of the anchor, the SVR3 server id clients derive the
            server's authorisation key with).
        group_id: the SVR group's 64-bit id (clients salt the PIN hash with it).
        anchor: the freshness anchor (a QuorumAnchor over the attested members).
        wait_timeout: seconds a commit waits for the anchor (then 503, the change stays stored).

    Raises:
        SvrConfigError: a bad name or group id.
    """

    def __init__(self, store: Store, keys: SvrKeys, *, name: str, group_id: int, anchor: Anchor,
                 wait_timeout: float = 5.0) -> None:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise SvrConfigError("server name must be 1..64 characters of A-Z a-z 0-9 . _ -")
        if isinstance(group_id, bool) or not isinstance(group_id, int) or not 0 <= group_id < 2**64:
            raise SvrConfigError("group_id must be an unsigned 64-bit integer")
        self.name = name
        self.group_id = group_id
        self.fresh = FreshStore(store, ledger=name, mac_key=keys.freshness_key, anchor=anchor,
                                wait_timeout=wait_timeout)
        self.engine = RecordEngine(self.fresh, keys.keyset, namespace_prefix=ENGINE_PREFIX)
        self.svr2 = svr2.Svr2(BackupTable(self.engine, self.fresh, svr2.NAMESPACE, Svr2Row))
        self.svr3 = svr3.Svr3(BackupTable(self.engine, self.fresh, svr3.NAMESPACE, Svr3Row))
        self._stop = threading.Event()
        self._audit: Any = None
        if self.fresh.problem is not None:
            log.error("SVR %s is not serving: %s", name, self.fresh.problem)

    def info(self) -> dict[str, Any]:
        """Public facts: name, group id, protocols, OPRF suite, limits, whether it serves."""
        return {"name": self.name, "group_id": self.group_id, "protocols": ["svr2", "svr3"],
                "suite": oprf.SUITE_ID, "min_tries": MIN_TRIES, "max_tries": MAX_TRIES,
                "max_secret": MAX_SECRET, "serving": self.fresh.problem is None}

    def health(self) -> tuple[bool, str]:
        """``(serving, reason)``: not serving while the FreshStore holds a finding, or while the
        last background audit (:meth:`start_audit`) found a row rolled back, deleted or restored."""
        p = self.fresh.problem
        if p is not None:
            return False, f"{type(p).__name__}: {p}"
        rows = self.audit_findings()
        if rows:
            return False, f"freshness audit: {type(rows[0]).__name__}: {rows[0]}"
        return True, ""

    def start_audit(self, interval: float) -> None:
        """Audit every row in the background every ``interval`` seconds (the first run at once;
        :class:`safehold.freshness.audit.AuditThread`): rows that no operation reads are checked
        too, and a finding turns :meth:`health` (``/healthz``) to 503 until a clean run."""
        from safehold.freshness.audit import AuditThread

        if self._audit is None:
            self._audit = AuditThread(self.fresh, interval).start()

    def audit_findings(self) -> list[Exception]:
        """Row findings of the last background audit (store-level problems are :meth:`health`'s)."""
        from safehold.freshness.errors import RowFreshnessError

        last = self._audit.last if self._audit is not None else []
        return [f for f in last if isinstance(f, RowFreshnessError)]

    def status(self) -> dict[str, Any]:
        """The FreshStore's status (epochs, rows per namespace) for operators."""
        return self.fresh.status()

    # -- the owner's freshness steps ----------------------------------------------------------

    def freshness_statement(self) -> dict[str, Any]:
        """What the owner is asked to sign: ``{action, proposal, payload}`` (``payload`` is the
        canonical statement, base64url, addressed to the members reachable now). ``action`` is
        ``initialise`` for a new ledger, else ``reanchor``.

        Raises:
            AnchorUnavailableError: fewer than a majority of members answer.
        """
        from safehold.freshness.anchor.statements import b64
        from safehold.freshness.errors import LedgerUninitialisedError
        from safehold.freshness.recovery import statement_for

        action = "initialise" if isinstance(self.fresh.problem, LedgerUninitialisedError) else "reanchor"
        st = statement_for(self.fresh, action)
        return {"action": action, "proposal": self.fresh.reanchor_proposal(), "payload": b64(st.payload())}

    def reanchor(self, signed: object) -> AnchorHead:
        """Apply the owner's signed statement (wire form ``{"payload", "signature"}``).

        Raises:
            OwnerStatementError: malformed, wrong ledger or head, refused by the members.
        """
        return self.fresh.reanchor(SignedOwnerStatement.from_json(signed))

    def retry_anchor(self, interval: float = 1.0) -> None:
        """Background thread: while the anchor was unreachable at start-up, retry the
        comparison every ``interval`` seconds (a member set that comes up later is picked up)."""

        def run() -> None:
            while not self._stop.wait(interval):
                if not isinstance(self.fresh.problem, AnchorUnavailableError):
                    continue
                try:
                    self.fresh.recover()
                    log.info("SVR %s: anchor reachable, serving", self.name)
                except Exception as e:  # noqa: BLE001 - logged, retried
                    log.warning("SVR %s: anchor still not usable: %s", self.name, e)

        threading.Thread(target=run, name="svr-anchor-retry", daemon=True).start()

    def close(self) -> None:
        """Stop background work and close the FreshStore (and the store under it)."""
        self._stop.set()
        if self._audit is not None:
            self._audit.stop()
        self.fresh.close()
