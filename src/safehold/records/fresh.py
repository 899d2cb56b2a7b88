"""The records service's freshness wiring (issue 12): its store inside a
:class:`~safehold.freshness.store.FreshStore`, the service state while the store is not fresh,
the owner's re-anchoring, and the background audit. Framework-free (``http.py`` maps it).

* :func:`open_fresh_store` wraps the untrusted store: ledger = the workload's name (= the CN of
  the TLS certificate the broker issued to this workload, which the anchor members accept as
  the client certificate for that ledger), MAC key = HKDF(keyset ``index_key``, purpose
  ``records/freshness``), posting namespaces ``*.postings`` grouped by the 10-byte blind term
  prefix (:mod:`safehold.records.search`, posting format 5) and ``*.search`` by 16 bytes (formats
  1 to 4: the rebuild drops their rows through the FreshStore), anchor = a
  :class:`~safehold.freshness.anchor.client.QuorumAnchor` over the members named in the
  measured configuration, each appraised against the measured ``anchor_policy`` before a byte
  is sent.
* :class:`Freshness` is what the HTTP layer asks: is the store fresh (``/healthz`` 503 with the
  reason otherwise), the owner's proposal and re-anchoring, the background audit's findings
  (an audit that found tampering nobody read turns ``/healthz`` 503 until the next clean run).

While the store is not fresh (the anchor lost the ledger, a new ledger, a store restored from
an earlier copy, a fork, a corrupt journal, the anchor unreachable at start) every record
operation raises the finding (503 ``not-fresh``; ``anchor-unavailable``), and only
``/healthz`` and the owner routes answer. The deferred start-up steps (audit head check,
search index rebuild) run once it becomes fresh.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from safehold.crypto.kdf import derive_key
from safehold.crypto.keyset import Keyset
from safehold.freshness.anchor.base import AnchorHead
from safehold.freshness.errors import FreshnessError
from safehold.freshness.store import FreshStore
from safehold.freshness.vmap import NamespacePolicy
from safehold.records.search import NAMESPACE_SUFFIX, OLD_NAMESPACE_SUFFIX, OLD_PREFIX_LEN, PREFIX_LEN
from safehold.store.base import Store

__all__ = ["FRESHNESS_PURPOSE", "POSTINGS_POLICY", "Freshness", "open_fresh_store"]

log = logging.getLogger("safehold.records")

#: HKDF purpose of the FreshStore's MAC key (journal entries, leaves), from ``index_key``.
FRESHNESS_PURPOSE = "records/freshness"
#: Posting namespaces are read per blind term prefix: ``<prefix><namespace>.postings`` (format
#: 5) by :data:`~safehold.records.search.PREFIX_LEN` bytes, and ``<prefix><namespace>.search``
#: (formats 1 to 4) by 16 bytes. The second entry stays for good: a store that held old postings
#: keeps that namespace in its journal and snapshots (empty once rebuilt), and the verifier map
#: refuses a journaled namespace whose policy changed (ConfigError).
POSTINGS_POLICY = {f"*{NAMESPACE_SUFFIX}": PREFIX_LEN, f"*{OLD_NAMESPACE_SUFFIX}": OLD_PREFIX_LEN}


def open_fresh_store(store: Store, keyset: Keyset, *, ledger: str, anchor_members: list[str],
                     anchor_policy: Any, cert_pem: bytes, key_pem: bytes,
                     wait_timeout: float = 5.0) -> FreshStore:
    """Wrap ``store`` in a FreshStore anchored by the attested members (module docstring).

    Args:
        ledger: the workload name (the CN of ``cert_pem``).
        anchor_members: the members' ``https://`` URLs. anchor_policy: their
            :class:`~safehold.attestation.policy.AppraisalPolicy`.
        cert_pem / key_pem: this workload's TLS identity from the broker (in memory; used as
            the mutual-TLS client certificate towards the members, loaded via memfd).
        wait_timeout: seconds a commit waits for the anchor.

    Returns:
        the FreshStore; never raises a freshness finding (``fs.problem`` holds it).

    Raises:
        ConfigError: the anchor client cannot be built. StoreError: the database failed.
    """
    from safehold.attestation.verifier import Verifier
    from safehold.freshness.anchor.client import QuorumAnchor

    anchor = QuorumAnchor(anchor_members, Verifier(anchor_policy), client_cert_pem=cert_pem,
                          client_key_pem=key_pem)
    fs = FreshStore(store, ledger=ledger, mac_key=derive_key(keyset.index_key, purpose=FRESHNESS_PURPOSE),
                    anchor=anchor, policy=NamespacePolicy(POSTINGS_POLICY), wait_timeout=wait_timeout)
    if fs.problem is not None:
        banner = "!" * 78
        log.error(banner)
        log.error("STORE NOT FRESH, NOT SERVING RECORDS: %s", fs.problem)
        log.error("the data owner decides: `safehold freshness proposal` shows what re-anchoring "
                  "would accept, `safehold freshness reanchor` signs it (docs/freshness.md)")
        log.error(banner)
    else:
        st = fs.status()
        log.info("freshness: ledger %r fresh at epoch %d (%d rolled forward)", ledger,
                 st["committed_epoch"], st["rolled_forward"])
    return fs


class Freshness:
    """The service's view of its FreshStore (module docstring).

    Args:
        fs: the FreshStore under the repository.
        on_fresh: called once (on a background thread or the re-anchoring request's) when the
            store becomes fresh after start-up found it not fresh: the deferred start-up steps.
    """

    def __init__(self, fs: FreshStore, on_fresh: Callable[[], None] | None = None) -> None:
        self.fs = fs
        self._on_fresh: list[Callable[[], None]] = [on_fresh] if on_fresh is not None else []
        self._started = fs.problem is None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.findings: list[FreshnessError] = []
        self.audit: Any = None

    def on_fresh(self, callback: Callable[[], None]) -> None:
        """Add a callback run once the store becomes fresh (see the class docstring); callbacks
        run in the order they were added. Added after the store became fresh: run now."""
        with self._lock:
            started = self._started
            if not started:
                self._on_fresh.append(callback)
        if started:
            callback()

    def health(self) -> tuple[bool, str]:
        """``(fresh, reason)``: not fresh while the store holds a finding or the last background
        audit found tampering (the reason names the first finding, never a value)."""
        p = self.fs.problem
        if p is not None:
            return False, f"{type(p).__name__}: {p}"
        found = self.current_findings()
        if found:
            f = found[0]
            return False, f"audit found {len(found)} finding(s); first {type(f).__name__}: {f}"
        return True, ""

    def current_findings(self) -> list[FreshnessError]:
        """The last background audit's findings ([] = clean, or no audit yet)."""
        return list(self.audit.last) if self.audit is not None else list(self.findings)

    def status(self) -> dict[str, Any]:
        """The FreshStore's status plus audit runs and findings (operators; no values)."""
        st = self.fs.status()
        st["problem_type"] = None if self.fs.problem is None else type(self.fs.problem).__name__
        st["audit_findings"] = [f"{type(f).__name__}: {f}" for f in self.current_findings()[:20]]
        st["audit_runs"] = 0 if self.audit is None else self.audit.runs
        return st

    def statement(self) -> dict[str, Any]:
        """What the owner is asked to sign: ``{action, proposal, payload}`` (``payload``: the
        canonical statement, base64url, addressed to the members reachable now); ``action`` is
        ``initialise`` for a new ledger, else ``reanchor``.

        Raises:
            AnchorUnavailableError: fewer than a majority of members answer.
        """
        from safehold.freshness.anchor.statements import b64
        from safehold.freshness.errors import LedgerUninitialisedError
        from safehold.freshness.recovery import statement_for

        action = "initialise" if isinstance(self.fs.problem, LedgerUninitialisedError) else "reanchor"
        st = statement_for(self.fs, action)
        return {"action": action, "proposal": self.fs.reanchor_proposal(), "payload": b64(st.payload())}

    def reanchor(self, signed: object) -> AnchorHead:
        """Apply the owner's signed statement (wire form ``{"payload", "signature"}``), then run
        the deferred start-up steps. The statement is committed into the journal by the
        FreshStore; the caller writes the access-audit entry.

        Raises:
            OwnerStatementError: malformed, wrong ledger or head, not the owner's, refused.
            AnchorUnavailableError: no majority answered.
        """
        from safehold.freshness.anchor.statements import SignedOwnerStatement

        head = self.fs.reanchor(SignedOwnerStatement.from_json(signed))
        if self.audit is not None:
            self.audit.last = []
        self._became_fresh()
        return head

    def _became_fresh(self) -> None:
        with self._lock:
            if self._started or self.fs.problem is not None:
                return
            self._started = True
        log.info("freshness: ledger %r is fresh, serving", self.fs.ledger)
        for callback in self._on_fresh:
            callback()

    def start_background(self, audit_seconds: float, retry_seconds: float = 1.0) -> None:
        """Start the background audit (every ``audit_seconds``; 0 = off) and a thread that, every
        ``retry_seconds`` while the store is not fresh because the anchor was unreachable or lost
        the ledger, compares with the anchor again (:meth:`FreshStore.rejoin`): the store serves
        again once the anchor answers, or once the owner re-anchored the ledger through another
        writer (a worker or replica of the same ledger)."""
        from safehold.freshness.audit import AuditThread

        def retry() -> None:
            while not self._stop.wait(retry_seconds):
                if self.fs.problem is None:
                    self._became_fresh()
                    continue
                try:
                    if self.fs.rejoin():
                        self._became_fresh()
                except FreshnessError as e:
                    log.warning("freshness: anchor not usable yet: %s", e)
                except Exception as e:  # noqa: BLE001 - database trouble: next round
                    log.warning("freshness: comparing with the anchor failed: %s", e)

        threading.Thread(target=retry, name="safehold-records-anchor-retry", daemon=True).start()
        if audit_seconds > 0:
            self.audit = AuditThread(self.fs, audit_seconds, on_findings=self._alarm).start()

    def _alarm(self, findings: list[FreshnessError]) -> None:
        banner = "!" * 78
        log.error(banner)
        log.error("FRESHNESS AUDIT: %d row(s) of the database differ from the verified state; "
                  "first: %s", len(findings), findings[0])
        log.error(banner)

    def close(self) -> None:
        """Stop the background threads (the FreshStore is closed by its owner)."""
        self._stop.set()
        if self.audit is not None:
            self.audit._stop.set()
