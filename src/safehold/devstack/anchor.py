"""The local stack's freshness anchor (docs/freshness.md): three attested member processes on
loopback, the ledgers' first initialisation, re-anchoring guarded by the owner's checkpoint,
and the checkpoint kept fresh while the stack runs.

Data directory::

    anchor/anchor-member.toml   the members' measured configuration (identical for all three)
    anchor/ports.json           the members' loopback ports, chosen once: the URLs are part of
                                the members' measurement and of records.toml, so they stay put
    anchor/member<i>.log|json   logs and ready files
and in the owner directory (the owner's side, beside ``owner.key``; the servers never read it)::

    anchor-checkpoint.json      the owner's checkpoint: per ledger the latest signed head seen
                                (refreshed every few seconds and at stop). Not in the data
                                directory: the operator who restores an old database must not
                                be able to move the checkpoint back with it

The members hold the ledger heads in memory only, so stopping the whole stack loses them: on the
next ``safehold up`` every member starts in lost mode. The development owner (``owner.key`` of
the owner directory) then re-anchors each ledger **only if** the store's head is not older than,
and does not fork from, the checkpoint (:func:`~safehold.freshness.anchor.statements.
check_against_checkpoint`); a store restored from an earlier copy while the stack was stopped is
refused and stays unserved until the owner decides (``safehold freshness reanchor
--accept-rollback``). Every step is printed; nothing is silent.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from safehold.attestation.closure import Closure
from safehold.devstack.errors import StackError
from safehold.devstack.stack import Stack
from safehold.errors import SafeholdError
from safehold.freshness.anchor.launch import LocalAnchor, free_ports
from safehold.fsutil import write_atomic

__all__ = ["ANCHOR_DIR", "CHECKPOINT_FILE", "LEDGERS", "CheckpointKeeper", "anchor_policy",
           "anchor_ports", "checkpoint_now", "checkpoint_path", "freshness_status", "load_checkpoints",
           "local_anchor",
           "measure_anchor", "proposal", "read_client", "reanchor",
           "settle_ledger", "take_checkpoint", "write_broker_anchor"]

ANCHOR_DIR = "anchor"
CHECKPOINT_FILE = "anchor-checkpoint.json"
#: The ledgers of the local stack's writers (the anchor client certificate's CN = the ledger).
LEDGERS = ("broker", "records")
#: Where each ledger's service serves the owner's freshness routes, and whether they need the
#: records admin token (the broker's need none: the members verify the owner's signature).
ROUTES = {"records": ("/v1/freshness", True), "broker": ("/freshness", False)}
#: The broker's run-time anchor settings file (not measured: docs/freshness.md says why).
BROKER_ANCHOR_FILE = "broker-anchor.toml"
MEMBERS = 3


def anchor_ports(d: Path, n: int = MEMBERS) -> list[int]:
    """The members' ports for data directory ``d``: chosen once (free ports), then kept in
    ``anchor/ports.json`` (the URLs are measured)."""
    p = d / ANCHOR_DIR / "ports.json"
    with contextlib.suppress(OSError, ValueError):
        ports = json.loads(p.read_text("utf-8"))
        if isinstance(ports, list) and len(ports) == n and all(isinstance(x, int) for x in ports):
            return ports
    ports = free_ports(n)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(p, json.dumps(ports).encode(), mode=0o644)
    return ports


def local_anchor(d: Path, owner_pub_pem: str, package_root: str | None = None) -> LocalAnchor:
    """The data directory's members (not started): configuration written, ports fixed; they
    authenticate clients by the broker's workload CA (``broker/ca.pem``) and accept owner
    statements signed by ``owner_pub_pem``."""
    return LocalAnchor(d / ANCHOR_DIR, data_dir=d / "tee", client_ca_file=d / "broker" / "ca.pem",
                       owner_public_key=owner_pub_pem, n=MEMBERS, ports=anchor_ports(d),
                       package_root=Path(package_root) if package_root else None)


def measure_anchor(d: Path, la: LocalAnchor, package_root: str | None = None) -> Closure:
    """The members' measured closure as their simulated TEE will report it (``.hex()`` is the
    measurement): their launch (``package_root``'s copy, as ``la`` runs it) with their
    configuration. The records and service workloads share its interpreter and ``sys.path``,
    so the data directory's other measurements reuse its code hashes."""
    return la.closure()


def anchor_policy(la: LocalAnchor, measurement: str) -> dict[str, Any]:
    """The members' appraisal policy (their own Reference Value; SIMULATED TEE)."""
    return {"name": "anchor", "allow_simulated": True, "simulated_root": str(la.simulated_root),
            "reference_values": {"measurements": [measurement]}}


def read_client(s: Stack) -> Any:
    """A read-only :class:`~safehold.freshness.anchor.client.QuorumAnchor` over the stack's
    members, appraising each against the policy in ``records.toml``."""
    import tomllib

    from safehold.attestation.policy import AppraisalPolicy
    from safehold.attestation.verifier import Verifier
    from safehold.freshness.anchor.client import QuorumAnchor

    cfg = tomllib.loads(s.path("records.toml").read_text("utf-8"))
    return QuorumAnchor(cfg["anchor_members"], Verifier(AppraisalPolicy.from_dict(cfg["anchor_policy"])))


def checkpoint_path(s: Stack) -> Path:
    """``<owner dir>/anchor-checkpoint.json``."""
    return s.owner_path(CHECKPOINT_FILE)


def load_checkpoints(p: Path) -> dict[str, Any]:
    """``ledger → AnchorCheckpoint`` from the checkpoint file ``p`` ({} if none).

    Raises:
        StackError: the file exists but is malformed (never ignored: it guards re-anchoring).
    """
    from safehold.freshness.anchor.statements import AnchorCheckpoint

    if not p.exists():
        return {}
    try:
        doc = json.loads(p.read_text("utf-8"))
        return {k: AnchorCheckpoint.from_json(v) for k, v in doc["ledgers"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafeholdError) as e:
        raise StackError(f"{p} is malformed ({e}); it guards re-anchoring, so it is not ignored: "
                         "restore it or remove it knowingly") from None


def take_checkpoint(s: Stack, client: Any, ledgers: tuple[str, ...] = LEDGERS, *,
                    allow_back: tuple[str, ...] = ()) -> dict[str, int]:
    """Read each ledger's signed head and write ``anchor-checkpoint.json`` (only heads at or
    after the stored ones replace them, except for the ledgers in ``allow_back``: the owner
    explicitly accepted an older state). Returns ``ledger → epoch`` written.

    Raises:
        FreshnessError: the anchor has no majority / lost the ledger (the old file stays).
    """
    with _CHECKPOINT_LOCK:  # two keepers (the stack's ledgers, the SVR group's) share the file
        return _take_checkpoint(s, client, ledgers, allow_back)


#: serialises the load-modify-write of the checkpoint file within one ``safehold up``
_CHECKPOINT_LOCK = threading.Lock()


def _take_checkpoint(s: Stack, client: Any, ledgers: tuple[str, ...], allow_back: tuple[str, ...]
                     ) -> dict[str, int]:
    from safehold.freshness.anchor.statements import AnchorCheckpoint
    from safehold.freshness.errors import FreshnessError

    cps = load_checkpoints(checkpoint_path(s))
    infos = {m.member: (m.certificate, m.endorsement) for m in client.members()}
    out: dict[str, int] = {}
    for led in ledgers:
        try:
            head = client.head(led)
        except FreshnessError:
            continue
        if head is None:
            continue
        old = cps.get(led)
        if old is not None and head.epoch < old.head.epoch and led not in allow_back:
            continue  # never move the checkpoint back (the owner decides that explicitly)
        signers = {sig.member: infos[sig.member] for sig in head.signatures if sig.member in infos}
        cps[led] = AnchorCheckpoint(led, head, signers)
        out[led] = head.epoch
    doc = {"ledgers": {k: v.to_json() for k, v in cps.items()}}
    write_atomic(checkpoint_path(s), json.dumps(doc, indent=1).encode(), mode=0o600)
    return out


class CheckpointKeeper:
    """Refreshes ``anchor-checkpoint.json`` every ``interval`` seconds on a daemon thread, and
    once more at :meth:`stop` (call it before the members stop)."""

    def __init__(self, s: Stack, interval: float = 5.0, *, client: Any = None,
                 ledgers: tuple[str, ...] = LEDGERS) -> None:
        self.s, self.interval, self.ledgers = s, interval, ledgers
        self.client = client if client is not None else read_client(s)
        self._stop = threading.Event()
        self.last: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="safehold-checkpoint", daemon=True)

    def start(self) -> CheckpointKeeper:
        """Start; returns self."""
        self._thread.start()
        return self

    def _once(self) -> None:
        with contextlib.suppress(SafeholdError, OSError):
            self.last = take_checkpoint(self.s, self.client, self.ledgers)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._once()

    def stop(self) -> None:
        """Stop the thread and take a last checkpoint."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._once()
        self.client.close()


def _service(s: Stack, url: str, ledger: str, method: str, path: str, body: Any = None) -> httpx.Response:
    """One request of the owner's to a service's freshness routes, over TLS checked against the
    workload CA the owner pinned (:func:`pinned_ca_pem`), with the admin token where needed."""
    import ssl

    from safehold.devstack.datadir import tokens

    prefix, auth = ROUTES[ledger]
    ctx = ssl.create_default_context(cadata=pinned_ca_pem(s).decode("ascii"))
    hdr = {"Authorization": f"Bearer {tokens(s.data_dir, s.owner_dir)['admin']}"} if auth else {}
    with httpx.Client(base_url=url, verify=ctx, timeout=30, headers=hdr) as c:
        return c.request(method, prefix + path, json=body)


def pinned_ca_pem(s: Stack) -> bytes:
    """The data directory's workload CA (PEM), after checking it against the owner's pin
    (``<owner dir>/pins.json``, written by ``safehold up`` when it created the CA).

    Raises:
        StackError: no pin for this data directory, or the CA file is not the pinned CA (the
            operator replaced it: the owner's token and signatures must not go to an impostor).
    """
    from safehold.devstack.datadir import OWNER_PINS_FILE, pinned_workload_ca
    from safehold.errors import ConfigError

    p = s.owner_path(OWNER_PINS_FILE)
    try:
        want, pem = pinned_workload_ca(s.data_dir, p)
    except ConfigError as e:
        raise StackError(str(e)) from None
    if not want:
        raise StackError(f"{p} pins no workload CA for {s.data_dir}: start it with `safehold up` "
                         "(which records the CA it creates) before the owner's steps")
    if pem is not None:
        return pem
    raise StackError(f"the workload CA in {s.data_dir} is not the one the owner pinned ({p}): "
                     "refusing to send the owner's token or sign for a service it does not vouch for")


def _owner_statement(doc: dict[str, Any], ledger: str) -> Any:
    """The statement the owner would sign, parsed from the service's ``payload`` — the only
    thing signed, so the only thing checked (``proposal`` is for display and may disagree).

    Raises:
        StackError: the payload names another ledger or action than asked for, or its head
            disagrees with the proposal shown (a service, or something in between, lies).
    """
    from safehold.freshness.anchor.statements import SignedOwnerStatement

    try:
        st = SignedOwnerStatement.from_json({"payload": doc["payload"], "signature": "AA"}).statement
    except (KeyError, TypeError, SafeholdError) as e:
        raise StackError(f"{ledger}: the service's statement is malformed: {e}") from None
    prop = doc.get("proposal") or {}
    if st.ledger != ledger or st.action != doc.get("action"):
        raise StackError(f"{ledger}: the statement is for ledger {st.ledger!r}, action {st.action!r}; "
                         f"asked for {ledger!r}, {doc.get('action')!r}: refused")
    if (prop.get("epoch"), prop.get("digest")) != (st.epoch, st.digest.hex()):
        raise StackError(f"{ledger}: the statement sets epoch {st.epoch} but the proposal shows epoch "
                         f"{prop.get('epoch')}: refused (what is shown must be what is signed)")
    return st


def write_broker_anchor(d: Path, members: list[str], policy: dict[str, Any]) -> Path:
    """Write the broker's run-time anchor settings (:class:`safehold.broker.fresh.AnchorSettings`)."""
    import tomli_w

    p = d / BROKER_ANCHOR_FILE
    p.write_text(tomli_w.dumps({"anchor_members": members, "anchor_policy": policy}), "utf-8")
    return p


def _anchor_lost(s: Stack, ledger: str) -> bool:
    """True only if the anchor itself says it lost ``ledger`` (asked directly, not inferred
    from the service's message)."""
    from safehold.freshness.errors import AnchorLostError, FreshnessError

    client = read_client(s)
    try:
        client.head(ledger)
    except AnchorLostError:
        return True
    except FreshnessError:
        return False
    finally:
        client.close()
    return False


def settle_ledger(s: Stack, url: str, ledger: str, *, say: Any = print) -> str:
    """Bring a service's ledger to serving with the development owner key, loudly, where that is
    safe; returns what happened (``fresh``, ``initialised``, ``re-anchored``, ``refused: ...``).

    * a new ledger: the ``initialise`` statement is signed with ``owner.key`` and posted;
    * the anchor lost the ledger (the members restarted with the stack): re-anchored only if the
      store's head is not older than the owner's checkpoint and does not fork from it;
    * anything else (a store behind the anchor, a fork, a corrupt journal): left to the owner.

    Raises:
        StackError: the service does not answer, or refused the signed statement.
    """
    from safehold.freshness.anchor.statements import (
        OwnerStatement,
        check_against_checkpoint,
        sign_owner_statement,
    )
    from safehold.freshness.errors import FreshnessError

    deadline = time.monotonic() + 30
    while True:
        try:
            st = _service(s, url, ledger, "GET", "").json()
        except (httpx.HTTPError, ValueError) as e:
            raise StackError(f"{ledger}: freshness status unreachable ({type(e).__name__})") from None
        if st.get("serving"):
            return "fresh"
        if st.get("problem_type") != "AnchorUnavailableError" or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # the members are still catching up among themselves
    r = _service(s, url, ledger, "GET", "/proposal")
    if r.status_code != 200:
        return f"refused: no proposal ({r.status_code} {r.text[:200]})"
    doc = r.json()
    prop, action = doc["proposal"], doc["action"]
    # the unsigned statement the service built: what is checked is exactly what gets signed
    statement = _owner_statement(doc, ledger)
    if action == "reanchor" and not _anchor_lost(s, ledger):
        # the anchor holds a head: the store disagrees with it
        return f"refused: {prop.get('problem')} (the owner decides: safehold freshness reanchor)"
    # initialise too: a ledger the anchor does not know but the owner's checkpoint does is a
    # store that lost its history (or an anchor that lost it), never a new one
    cp = load_checkpoints(checkpoint_path(s)).get(ledger)
    try:
        check_against_checkpoint(ledger, statement.head(), cp)
    except FreshnessError as e:
        return f"refused: {e}"
    assert isinstance(statement, OwnerStatement)
    signed = sign_owner_statement(statement, s.owner_path("owner.key").read_bytes())
    say(f"!!! {'initialising' if action == 'initialise' else 're-anchoring'} freshness ledger "
        f"{ledger!r} at epoch {prop['epoch']} ({prop['rows']} rows) with the DEVELOPMENT owner key "
        f"{s.owner_path('owner.key')}"
        + ("" if action == "initialise" else " (not older than the checkpoint)"))
    r = _service(s, url, ledger, "POST", "/reanchor", signed.to_json())
    if r.status_code != 200:
        raise StackError(f"{ledger}: the signed {action} statement was refused: "
                         f"{r.status_code} {r.text[:300]}")
    return "initialised" if action == "initialise" else "re-anchored"


# --- the owner's view and steps (``safehold freshness``, ``safehold status``) -------------------


def _running(data_dir: Path, owner: str | Path | None = None) -> tuple[Stack, dict[str, Any]]:
    """The running stack of ``data_dir`` (from ``up.json``) and that file's content.

    Raises:
        StackError: no running stack.
    """
    p = data_dir / "up.json"
    try:
        info = json.loads(p.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise StackError(f"no running stack in {data_dir} ({type(e).__name__}): start `safehold up`"
                         ) from None
    s = Stack(data_dir, 0, 0, None, owner_dir=Path(owner) if owner else None)
    s.info = info
    return s, info


def _url(info: dict[str, Any], ledger: str) -> str:
    """The ``ledger``'s service URL from ``up.json`` (the operator's file): https only — the
    pinned workload CA is checked in the TLS handshake, and over http:// the admin token and the
    owner's signed statement would go in the clear."""
    from safehold.devstack.datadir import https_url
    from safehold.errors import ConfigError

    key = "broker_url" if ledger == "broker" else "records_url"
    url = info.get(key)
    if not url:
        raise StackError(f"the {ledger} service is not running (see `safehold up`'s output)")
    try:
        return https_url(url, f"up.json ({key})")
    except ConfigError as e:
        raise StackError(str(e)) from None


def freshness_status(data_dir: Path, owner: str | Path | None = None) -> dict[str, Any]:
    """``{members: [...], ledgers: {ledger: {committed_epoch, anchored_epoch, serving, problem,
    checkpoint_epoch}}}`` of the running stack (members: ready / lost mode, incarnation);
    ``owner``: the owner directory (the records admin token)."""
    s, info = _running(data_dir, owner)
    out: dict[str, Any] = {"members": [], "ledgers": {}}
    try:
        client = read_client(s)
    except (OSError, KeyError, ValueError, SafeholdError) as e:
        return {"error": f"no anchor configured ({type(e).__name__})", **out}
    out["member_urls"] = client_urls(s)
    try:
        out["members"] = [{"member": m.member.hex()[:16], "ready": m.ready, "lost_mode": m.lost_mode}
                          for m in client.members()]
    except SafeholdError as e:
        out["members_error"] = str(e)
    finally:
        client.close()
    cps = load_checkpoints(checkpoint_path(s))
    for led in LEDGERS:
        row: dict[str, Any] = {"checkpoint_epoch": cps[led].head.epoch if led in cps else None}
        try:
            r = _service(s, _url(info, led), led, "GET", "")
            st = r.json()
            row.update({k: st.get(k) for k in ("serving", "problem", "committed_epoch",
                                                "anchored_epoch")})
        except (httpx.HTTPError, ValueError, StackError) as e:
            row["error"] = str(e) or type(e).__name__
        out["ledgers"][led] = row
    return out


def client_urls(s: Stack) -> list[str]:
    """The members' URLs from ``records.toml``."""
    import tomllib

    return list(tomllib.loads(s.path("records.toml").read_text("utf-8"))["anchor_members"])


def proposal(data_dir: Path, ledger: str, owner: str | Path | None = None) -> dict[str, Any]:
    """The service's ``{action, proposal, payload}`` for ``ledger``, plus ``checkpoint``: what
    the owner's checkpoint says of it (``ok``, ``older than ...``, ``forks ...``).

    Raises:
        StackError: the service does not answer.
    """
    from safehold.freshness.anchor.statements import check_against_checkpoint
    from safehold.freshness.errors import FreshnessError

    s, info = _running(data_dir, owner)
    r = _service(s, _url(info, ledger), ledger, "GET", "/proposal")
    if r.status_code != 200:
        raise StackError(f"{ledger}: no proposal: HTTP {r.status_code} {r.text[:300]}")
    doc: dict[str, Any] = r.json()
    statement = _owner_statement(doc, ledger)
    cp = load_checkpoints(checkpoint_path(s)).get(ledger)
    try:
        check_against_checkpoint(ledger, statement.head(), cp)
        doc["checkpoint"] = "ok" if cp is not None else "none"
    except FreshnessError as e:
        doc["checkpoint"] = f"{type(e).__name__}: {e}"
    return doc


def reanchor(data_dir: Path, ledger: str, key_pem: bytes, *, accept_rollback: bool = False,
             confirm: Any = None, owner: str | Path | None = None) -> dict[str, Any]:
    """The owner's re-anchoring: fetch the proposal, check it against the checkpoint (older:
    refused unless ``accept_rollback``; a fork: always refused), ask ``confirm(doc)`` (False
    stops), sign with ``key_pem`` (the owner key), post; then move the checkpoint to it.

    Returns:
        ``{ledger, epoch, digest}`` as the service answered.

    Raises:
        StoreRolledBackError / StoreForkedError: the checkpoint refuses it. StackError: the
            service refused the statement or does not answer; the owner declined.
    """
    from safehold.freshness.anchor.statements import check_against_checkpoint, sign_owner_statement

    s, info = _running(data_dir, owner)
    doc = proposal(data_dir, ledger, owner)
    statement = _owner_statement(doc, ledger)  # checked is what is signed
    check_against_checkpoint(ledger, statement.head(), load_checkpoints(checkpoint_path(s)).get(ledger),
                             accept_rollback=accept_rollback)
    if confirm is not None and not confirm(doc):
        raise StackError("not re-anchored: the owner declined")
    signed = sign_owner_statement(statement, key_pem)
    r = _service(s, _url(info, ledger), ledger, "POST", "/reanchor", signed.to_json())
    if r.status_code != 200:
        raise StackError(f"{ledger}: the signed statement was refused: HTTP {r.status_code} "
                         f"{r.text[:300]}")
    client = read_client(s)
    try:
        take_checkpoint(s, client, (ledger,), allow_back=(ledger,) if accept_rollback else ())
    except SafeholdError:
        pass  # the keeper of `safehold up` takes the next one
    finally:
        client.close()
    out: dict[str, Any] = r.json()
    return out


def checkpoint_now(data_dir: Path, owner: str | Path | None = None) -> dict[str, int]:
    """Take a checkpoint of every ledger now; ``ledger → epoch``."""
    s, _ = _running(data_dir, owner)
    client = read_client(s)
    try:
        return take_checkpoint(s, client)
    finally:
        client.close()
