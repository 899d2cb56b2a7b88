"""The broker's state under freshness (issue 12): its store inside a
:class:`~safehold.freshness.store.FreshStore` on ledger ``broker``, so manifest versions,
revocations, users, secrets and the audit head share one hash chain anchored by the attested
members, and a broker whose state is not fresh releases nothing. Framework-free.

Opening (:func:`open_fresh_broker`):

1. the state is opened on the raw store only to unseal the master key and load the workload CA
   (reads; on the very first start the state and its keys are created there, before any
   ledger exists — they are *adopted* into the ledger below);
2. the FreshStore's MAC key is ``HKDF(master key, purpose "broker/freshness")`` (never stored;
   the master key only opens inside the broker's TEE or through the recovery shares); the
   broker issues itself a client certificate (CN ``broker``, clientAuth and the attested-workload
   key purpose the members require of writers, 1 day) from its own CA
   to a key generated in memory, for mutual TLS to the members;
3. the FreshStore compares its journal with the anchor. Fresh: the broker core is built over it
   and serves. Not fresh (new ledger, anchor lost, state restored from an earlier copy, fork,
   corrupt journal, anchor unreachable): :class:`FreshnessGate` holds the reason; ``/kbs`` and
   every admin route answer 503 ``not-fresh`` naming it, and only the owner's re-anchoring
   (:meth:`FreshnessGate.reanchor`, a statement signed by the owner key the members pin) or the
   anchor coming back brings the broker up. The re-anchoring is recorded in the broker audit
   log (``freshness-reanchor``) and in the freshness journal.

**Adoption**: a state created before its ledger existed (the first start, or a broker that ran
without freshness) has rows the verifier map does not know. After the owner's ``initialise``
statement, one transaction moves every row of the broker's namespaces into the ledger (deleted
and re-inserted through the FreshStore, row versions restart at 1; the envelopes' associated
data names namespace and key, not the version) — atomically with its journal entry.

Not covered: the members' URLs and appraisal policy come from a run-time file (``--anchor``),
not from the broker's measurement: the broker's measurement decides its sealing key, which
decides its CA, which the members' measured configuration pins — measuring the members' policy
in the broker would be circular. A host that swaps that file for an anchor it controls defeats
the check; docs/freshness.md lists this.
"""

from __future__ import annotations

import logging
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safehold.broker.state import AUDIT_NAMESPACE, NAMESPACE, BrokerState, SealingIdentity
from safehold.crypto.kdf import derive_key
from safehold.errors import ConfigError, SafeholdError
from safehold.freshness.errors import AnchorUnavailableError, FreshnessError, LedgerUninitialisedError
from safehold.freshness.store import FreshStore
from safehold.store.base import Store

if TYPE_CHECKING:
    from safehold.broker.core import Broker

__all__ = ["LEDGER", "AnchorSettings", "FreshnessGate", "adopt_rows", "open_fresh_store"]

log = logging.getLogger("safehold.broker")

#: The broker's ledger (= the CN of its anchor client certificate).
LEDGER = "broker"
#: Namespaces of the broker's state (adopted into the ledger at initialisation).
STATE_NAMESPACES = (NAMESPACE, AUDIT_NAMESPACE)


@dataclass(frozen=True)
class AnchorSettings:
    """Where the anchor is and what it must measure as (a run-time TOML file, module docstring)::

        anchor_members = ["https://127.0.0.1:7601", ...]
        wait_timeout = 5.0
        [anchor_policy]          # AppraisalPolicy keys: the members' Reference Value
        ...
    """

    members: list[str]
    policy: Any
    wait_timeout: float = 5.0

    @classmethod
    def load(cls, path: str | Path) -> AnchorSettings:
        """Read the file.

        Raises:
            ConfigError: unreadable, unknown keys, no https members, an invalid policy.
        """
        from safehold.attestation.policy import AppraisalPolicy

        try:
            d = tomllib.loads(Path(path).read_text("utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"broker anchor settings {path}: {e}") from None
        unknown = set(d) - {"anchor_members", "anchor_policy", "wait_timeout"}
        if unknown:
            raise ConfigError(f"broker anchor settings: unknown keys {sorted(unknown)}")
        m = d.get("anchor_members")
        if not (isinstance(m, list) and m and all(isinstance(u, str) and u[:8] == "https://" for u in m)):
            raise ConfigError("broker anchor settings: anchor_members must list the members' https:// URLs")
        try:
            policy = AppraisalPolicy.from_dict({"name": "anchor", **d.get("anchor_policy", {})})
        except SafeholdError as e:
            raise ConfigError(f"broker anchor settings: anchor_policy: {e}") from None
        wt = d.get("wait_timeout", 5.0)
        if isinstance(wt, bool) or not isinstance(wt, int | float) or wt <= 0:
            raise ConfigError("broker anchor settings: wait_timeout must be a positive number")
        return cls(m, policy, float(wt))


def _client_identity(ca: Any) -> tuple[bytes, bytes]:
    """A client certificate (CN :data:`LEDGER`, clientAuth + the attested-workload key purpose,
    1 day) from the broker's own CA for a P-256 key generated here in the broker's TEE;
    ``(cert PEM, key PEM)``, held in memory only."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(key.public_key(), common_name=LEDGER, validity_days=1, client_only=True, attested=True)
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def open_fresh_store(store: Store, identity: SealingIdentity,
                     settings: AnchorSettings) -> tuple[FreshStore, Any]:
    """Steps 1-2 of the module docstring: ``(FreshStore over store, the workload CA)``.

    Raises:
        SealingError / StateIntegrityError: the raw state does not unseal or load (the broker's
            own recovery mode handles that; freshness starts after recovery).
        ConfigError: the anchor client cannot be built.
    """
    from safehold.attestation.verifier import Verifier
    from safehold.broker.core import load_keys
    from safehold.errors import SealingError
    from safehold.freshness.anchor.client import QuorumAnchor
    from safehold.freshness.vmap import NamespacePolicy

    raw = BrokerState.open(store, identity)
    if raw.mode != "ready":
        raise SealingError(f"broker state is sealed ({raw.reason}): recover it first")
    keys = load_keys(raw)[0]
    cert_pem, key_pem = _client_identity(keys.ca)
    anchor = QuorumAnchor(settings.members, Verifier(settings.policy), client_cert_pem=cert_pem,
                          client_key_pem=key_pem)
    fs = FreshStore(store, ledger=LEDGER, mac_key=derive_key(raw.master_key(), purpose="broker/freshness"),
                    anchor=anchor, policy=NamespacePolicy({}), wait_timeout=settings.wait_timeout)
    return fs, keys.ca


def adopt_rows(fs: FreshStore) -> int:
    """Move every row of the broker's namespaces that the ledger does not hold yet into it, in
    one transaction (module docstring, Adoption). Returns how many rows.

    Raises:
        FreshnessError: the store is not fresh; StoreError: the database failed (nothing moved).
    """
    fs.check()
    rows = [(ns, r) for ns in STATE_NAMESPACES for r in fs.inner.scan_all(ns)]
    known = {ns: fs.state.vmap.rows(ns) for ns in STATE_NAMESPACES}
    if not rows or any(known.values()):
        return 0
    with fs.transaction() as tx:
        for ns, r in rows:
            fs.inner.delete(ns, r.key)  # joins this transaction: moved atomically with the entry
            tx.put(ns, r.key, r.value, expected_version=0)
    log.warning("freshness: adopted %d broker state row(s) into ledger %r", len(rows), LEDGER)
    return len(rows)


class FreshnessGate:
    """The broker's freshness state (module docstring).

    Args:
        fs: the FreshStore. build: makes the :class:`~safehold.broker.core.Broker` over ``fs``
            once it is fresh (then ``broker`` is set and ``on_broker`` callbacks run).
    """

    def __init__(self, fs: FreshStore, build: Callable[[], Broker]) -> None:
        self.fs = fs
        self._build = build
        self.broker: Broker | None = None
        self.on_broker: list[Callable[[Broker], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.adopted = 0
        if fs.problem is None:
            self._open()
        else:
            banner = "!" * 78
            log.error(banner)
            log.error("BROKER STATE NOT FRESH, RELEASING NOTHING: %s", fs.problem)
            log.error("the data owner decides: `safehold freshness proposal --service broker` / "
                      "`safehold freshness reanchor --service broker` (docs/freshness.md)")
            log.error(banner)

    def _open(self) -> None:
        with self._lock:
            if self.broker is not None:
                return
            self.adopted = adopt_rows(self.fs)
            b = self._build()
            self.broker = b
        for cb in self.on_broker:
            cb(b)

    def reason(self) -> str:
        """Why the broker does not serve ("" when it does)."""
        p = self.fs.problem
        if p is not None:
            return f"{type(p).__name__}: {p}"
        return "" if self.broker is not None else "broker state not loaded yet"

    def require(self) -> Broker:
        """The broker, or raise the freshness finding (HTTP 503 ``not-fresh``).

        Raises:
            FreshnessError: the state is not fresh.
        """
        self.fs.check()
        if self.broker is None:
            raise AnchorUnavailableError("broker state not loaded yet")
        return self.broker

    def status(self) -> dict[str, Any]:
        """The FreshStore's status (epochs, rows per namespace; no values)."""
        st = self.fs.status()
        st["problem_type"] = None if self.fs.problem is None else type(self.fs.problem).__name__
        st["adopted"] = self.adopted
        return st

    def statement(self) -> dict[str, Any]:
        """``{action, proposal, payload}``: what the owner is asked to sign (as for records).

        Raises:
            AnchorUnavailableError: fewer than a majority of members answer.
        """
        from safehold.freshness.anchor.statements import b64
        from safehold.freshness.recovery import statement_for

        action = "initialise" if isinstance(self.fs.problem, LedgerUninitialisedError) else "reanchor"
        st = statement_for(self.fs, action)
        prop = self.fs.reanchor_proposal()
        prop["unadopted_rows"] = (sum(1 for ns in STATE_NAMESPACES for _ in self.fs.inner.scan_all(ns))
                                  if action == "initialise" else 0)
        return {"action": action, "proposal": prop, "payload": b64(st.payload())}

    def reanchor(self, signed: object) -> Any:
        """Apply the owner's signed statement, adopt rows of a new ledger, build the broker and
        record ``freshness-reanchor`` in its audit log.

        Raises:
            OwnerStatementError: malformed, wrong head, not the owner's; AnchorUnavailableError.
        """
        from safehold.freshness.anchor.statements import SignedOwnerStatement

        sos = SignedOwnerStatement.from_json(signed)
        head = self.fs.reanchor(sos)
        self._open()
        assert self.broker is not None
        self.broker.record("freshness-reanchor", {"ledger": LEDGER, "action": sos.statement.action,
                                                  "epoch": head.epoch, "digest": head.digest.hex()})
        return head

    def retry(self, interval: float = 1.0) -> None:
        """While the anchor was unreachable at start, retry every ``interval`` s (thread)."""

        def run() -> None:
            while not self._stop.wait(interval) and self.broker is None:
                if isinstance(self.fs.problem, AnchorUnavailableError):
                    try:
                        self.fs.recover()
                    except FreshnessError:
                        continue
                if self.fs.problem is None:
                    try:
                        self._open()
                    except SafeholdError as e:
                        log.error("broker state did not load after the anchor answered: %s", e)
                    return

        threading.Thread(target=run, name="safehold-broker-anchor-retry", daemon=True).start()

    def close(self) -> None:
        """Stop the retry thread."""
        self._stop.set()
