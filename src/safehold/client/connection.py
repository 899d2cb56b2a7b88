"""How a client reaches the records service of a local stack, and transport failures as one line.

:func:`load_connection` merges the ``up.json`` that ``safehold up`` writes into its data
directory (records URL, the appraisal policy for the service's Evidence, the workload CA) and the
admin token from the data owner's directory (:func:`owner_dir`, never the server's data
directory) with explicit settings; :func:`open_client` is the one way to talk to the service:
a :class:`~safehold.client.records.RecordsClient` over the attesting transport, with transport
failures (refused, dropped, timed out, TLS) mapped to :class:`ServiceUnreachableError` naming the
URL, and the simulated-TEE warning shown once as one line (:func:`simulated_tee_notice`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import ssl
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import httpx

from safehold.client.errors import ServiceUnreachableError
from safehold.client.records import RecordsClient
from safehold.errors import ConfigError

if TYPE_CHECKING:
    from safehold.attestation.verifier import Verifier

__all__ = [
    "OWNER_DIR_SUFFIX",
    "UP_FILE",
    "Connection",
    "load_connection",
    "owner_dir",
    "make_client",
    "open_client",
    "service_errors",
    "simulated_tee_notice",
    "transport_reason",
]

UP_FILE = "up.json"
#: The default owner directory of data directory ``D`` is the sibling ``D.owner``.
OWNER_DIR_SUFFIX = ".owner"


def owner_dir(data_dir: str | os.PathLike[str], explicit: str | os.PathLike[str] | None = None) -> Path:
    """The data owner's directory of the local stack in ``data_dir``: the owner's signing key
    (``owner.key``) and the bearer tokens (``tokens.json``), kept apart from the server's data.

    ``explicit`` (``--owner-dir``) wins, then ``SAFEHOLD_OWNER_DIR``, else the sibling
    ``<data_dir>.owner`` (e.g. ``./safehold-data.owner``). The server processes are never given
    this path. Returns the resolved path (it may not exist yet).
    """
    chosen = explicit or os.environ.get("SAFEHOLD_OWNER_DIR")
    if chosen:
        return Path(chosen).resolve()
    d = Path(data_dir).resolve()
    return d.with_name(d.name + OWNER_DIR_SUFFIX)



@dataclass
class Connection:
    """How to reach the records service: ``url``, ``policy`` (the path of a policy the caller
    gave, or the :class:`~safehold.attestation.verifier.Verifier` of the data directory's policy
    checked against the owner's pin), ``token``, ``ca`` (path; not used to trust anything: the
    service is trusted by its attested Evidence), and ``target``: the service identity import
    checkpoints are keyed on (URL, plus, when the URL is ``up.json``'s, its store URL and the
    SHA-256 of the workload CA the owner pinned in ``pins.json``)."""

    url: str
    policy: str | Verifier
    token: str | None
    ca: str | None
    target: str = ""


def load_connection(data_dir: str | os.PathLike[str], url: str | None = None,
                    policy: str | None = None, token: str | None = None,
                    owner: str | os.PathLike[str] | None = None) -> Connection:
    """Merge ``<data_dir>/up.json`` with explicit options (options win).

    The token is ``token``, else ``SAFEHOLD_TOKEN``, else the ``admin`` token in the owner
    directory's ``tokens.json`` (:func:`owner_dir` of ``data_dir`` and ``owner``), else none.

    Without ``policy``, the data directory's ``policy.toml`` is used only if it is the one the
    owner pinned (:func:`safehold.client.owner_pins.pinned_policy`; never the path ``up.json``
    names): the operator can write the data directory, and the token and records must not go
    to a server that only a weakened policy accepts. This is checked here, before any request.

    Raises:
        ConfigError: no URL or policy known (``safehold up`` not running and no options),
            ``up.json`` is unreadable, or the data directory's policy is not the pinned one (or
            none is pinned).
    """
    info: dict[str, Any] = {}
    p = Path(data_dir) / UP_FILE
    if p.exists():
        try:
            info = json.loads(p.read_text("utf-8"))
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: unreadable ({e})") from None
    same = url is None or url == info.get("records_url")
    url = url or info.get("records_url")
    if not url or not (policy or info.get("policy")):
        raise ConfigError(
            f"no records service known: run `safehold up` (writes {p}) or pass --url and --policy"
        )
    checked: str | Verifier = policy or _pinned(data_dir, owner)
    token = token or os.environ.get("SAFEHOLD_TOKEN") or _owner_admin_token(owner_dir(data_dir, owner))
    target = str(url)
    if same and info:
        # the workload CA as the owner pinned it (SHA-256 of its DER), not a file up.json names:
        # the operator could name a FIFO there and hang the CLI
        from safehold.client.owner_pins import OWNER_PINS_FILE, read_owner_pins

        ca_digest = ""
        with contextlib.suppress(ConfigError, AttributeError):  # no pin: the key just lacks it
            entry = read_owner_pins(owner_dir(data_dir, owner) / OWNER_PINS_FILE).get(
                str(Path(data_dir).resolve()), {})
            ca_digest = str(entry.get("workload_ca_sha256") or "")
        target += f" store={info.get('store_url', '')} ca={ca_digest}"
    return Connection(url, checked, token, info.get("ca"), target)


def _pinned(data_dir: str | os.PathLike[str], owner: str | os.PathLike[str] | None) -> Verifier:
    """The data directory's records policy as the owner pinned it; the policy logger's copy of
    the simulated-TEE warning at load is dropped (:func:`simulated_tee_notice` shows it once, at
    appraisal, as before when the policy was loaded there)."""
    from safehold.client.owner_pins import pinned_policy

    log, flt = logging.getLogger("safehold.attestation.policy"), _SimulatedTEENotice()
    log.addFilter(flt)
    try:
        return pinned_policy(data_dir, "records", owner)
    finally:
        log.removeFilter(flt)


def _owner_admin_token(d: Path) -> str | None:
    """The ``admin`` bearer token of ``<d>/tokens.json``, None if there is no such file.

    Raises:
        ConfigError: the file exists but is unreadable or holds no string ``admin`` token.
    """
    p = d / "tokens.json"
    try:
        tok = json.loads(p.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: unreadable ({type(e).__name__})") from None
    admin = tok.get("admin") if isinstance(tok, dict) else None
    if not isinstance(admin, str):
        raise ConfigError(f"{p}: no admin token in it")
    return admin


def make_client(conn: Connection) -> RecordsClient:
    """A :class:`~safehold.client.records.RecordsClient` over the attesting transport."""
    return RecordsClient(conn.url, token=conn.token, policy=conn.policy)


def transport_reason(e: BaseException) -> str:
    """One short phrase for a transport failure (``connection refused``, ``TLS handshake
    failed (…)``, ``no answer within the timeout``, ``connection closed …``)."""
    text = str(e).strip()
    low = text.lower()
    if isinstance(e, httpx.ConnectTimeout):
        return "connection timed out"
    if isinstance(e, httpx.TimeoutException):
        return "no answer within the timeout (the service may be stuck or overloaded)"
    if isinstance(e, httpx.RemoteProtocolError):
        return "the connection was closed before a complete answer (the service stopped or crashed?)"
    if isinstance(e, ssl.SSLError) or "ssl" in low or "certificate" in low or "handshake" in low:
        return f"TLS handshake failed ({text[:160] or type(e).__name__})"
    if "refused" in low:
        return "connection refused"
    if "name or service not known" in low or "nodename nor servname" in low:
        return "host name not found"
    if "reset by peer" in low:
        return "connection reset by the service"
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


class _SimulatedTEENotice(logging.Filter):
    """Drops the policy logger's copies of the simulated-TEE warning (at policy load and at
    appraisal): :func:`simulated_tee_notice` shows it itself, once, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIMULATED TEE Evidence" not in record.getMessage()


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def simulated_tee_notice(show: Callable[[str], None] = _to_stderr) -> Iterator[None]:
    """Show :class:`~safehold.attestation.policy.SimulatedTEEWarning` once, as the one line
    ``warning: <message>`` passed to ``show`` (default: printed on stderr) — not Python's
    two-line ``file:line: Warning`` display, not a second log line. The library still issues
    the warning; only its display inside the block changes."""
    from safehold.attestation.errors import SimulatedTEEWarning

    shown = False
    log = logging.getLogger("safehold.attestation.policy")
    flt = _SimulatedTEENotice()
    with warnings.catch_warnings():
        warnings.simplefilter("always", SimulatedTEEWarning)
        original = warnings.showwarning

        def display(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
            nonlocal shown
            if issubclass(category, SimulatedTEEWarning):
                if not shown:
                    shown = True
                    show(f"warning: {message}")
                return
            original(message, category, filename, lineno, file, line)

        warnings.showwarning = display
        log.addFilter(flt)
        try:
            yield
        finally:
            log.removeFilter(flt)


@contextlib.contextmanager
def service_errors(url: str) -> Iterator[None]:
    """Map transport failures inside the block to :class:`ServiceUnreachableError`
    (``cannot reach the records service at URL: connection refused``).

    Raises:
        ServiceUnreachableError: for httpx transport errors (connect, protocol, timeouts, TLS)
            and socket / TLS errors escaping the transport.
    """
    try:
        yield
    except (httpx.TransportError, ssl.SSLError, ConnectionError) as e:
        raise ServiceUnreachableError(
            f"cannot reach the records service at {url}: {transport_reason(e)}") from None


@contextlib.contextmanager
def open_client(conn: Connection, *, show: Callable[[str], None] = _to_stderr) -> Iterator[RecordsClient]:
    """The one way the CLI talks to the records service: a client from :func:`make_client`
    inside :func:`simulated_tee_notice` (``show`` displays its one line) and
    :func:`service_errors`."""
    with simulated_tee_notice(show), service_errors(conn.url), make_client(conn) as client:
        yield client


