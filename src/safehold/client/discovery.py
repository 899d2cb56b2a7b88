"""Client SDK for private contact discovery (docs/discovery.md).

The client normalises identifiers, blinds them (RFC 9497 Blind), has the service evaluate the
blinded elements, finalises them to OPRF outputs, and asks about the outputs; the service
answers obliviously with one fixed-size result per identifier. A :class:`QueryState` kept by the
caller (the CLI stores it in a file) carries the rate-limit token and the outputs already asked
about, so re-checking them is free and needs no new OPRF evaluation.

Transport: an attesting RA-TLS transport for an appraisal ``policy`` (production), a caller's
``transport``, or — only with ``insecure_loopback=True`` and an ``http://`` loopback URL — plain
HTTP, for the development server of this phase (loud: it is not attested).

This module imports no server code: only :mod:`safehold.crypto.oprf`, the shared
:mod:`safehold.discovery.identifiers` / :mod:`~safehold.discovery.protocol` and httpx.
"""

from __future__ import annotations

import base64
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from safehold.client.errors import DiscoveryClientError
from safehold.crypto import oprf
from safehold.discovery.errors import (
    InvalidRequestError,
    InvalidTokenError,
    RateLimitedError,
)
from safehold.discovery.identifiers import normalise, oprf_input
from safehold.discovery.protocol import (
    ELEMENT_SIZE,
    MAX_QUERY,
    MAX_REGISTER_BATCH,
    OUTPUT_SIZE,
    TOKEN_SIZE,
    check_user_id,
    decode_results,
    pack,
    unpack,
)
from safehold.netaddr import is_loopback_http

DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
#: Blinded elements per evaluate call.
EVALUATE_BATCH = 4096
Progress = Callable[[int, int], None]

@dataclass
class QueryState:
    """What a client keeps between queries: the last rate-limit ``token`` and the OPRF output of
    every identifier it has asked about (``"kind:canonical"`` → 64 bytes). Keep it private: it
    is the client's address book."""

    token: bytes | None = None
    asked: dict[str, bytes] = field(default_factory=dict)

    def to_json(self) -> str:
        """A JSON form (base64 values)."""
        return json.dumps({"version": 1,
                           "token": base64.b64encode(self.token).decode() if self.token else "",
                           "asked": {k: base64.b64encode(v).decode() for k, v in sorted(self.asked.items())}})

    @classmethod
    def from_json(cls, text: str) -> QueryState:
        """Parse :meth:`to_json` output.

        Raises:
            InvalidRequestError: malformed state.
        """
        try:
            obj = json.loads(text)
            token = base64.b64decode(obj["token"], validate=True) if obj["token"] else None
            asked = {str(k): base64.b64decode(v, validate=True) for k, v in obj["asked"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InvalidRequestError("discovery state is malformed") from None
        if obj.get("version") != 1 or (token is not None and len(token) != TOKEN_SIZE) \
                or any(len(v) != OUTPUT_SIZE for v in asked.values()):
            raise InvalidRequestError("discovery state is malformed")
        return cls(token, asked)


@dataclass(frozen=True)
class QueryResult:
    """``matches``: ``(kind, canonical identifier)`` → user id or None (not registered), in
    request order; ``charged`` new identifiers; ``used``/``limit`` this period; ``state`` for
    the next query."""

    matches: dict[tuple[str, str], str | None]
    charged: int
    used: int
    limit: int
    state: QueryState


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        code, detail = str(body.get("error", "")), str(body.get("detail", ""))
    except (ValueError, AttributeError):
        code, detail = "", resp.text[:200]
    msg = f"discovery service: HTTP {resp.status_code} {code}: {detail}".rstrip(": ")
    if resp.status_code == 429:
        retry = resp.headers.get("retry-after", "0")
        raise RateLimitedError(msg, int(retry) if retry.isdigit() else 0)
    if resp.status_code == 400 and code == "invalid-token":
        raise InvalidTokenError(msg)
    raise DiscoveryClientError(msg, resp.status_code, code)


class DiscoveryClient:
    """Synchronous discovery client.

    Args:
        base_url: the service's base URL.
        token: bearer token (roles ``query`` and/or ``register``).
        policy: appraisal policy for the service's RA-TLS Evidence (production path).
        transport: an httpx transport that itself authenticates the service.
        insecure_loopback: allow plain HTTP to a loopback URL (development server; warns).

    Raises:
        ValueError: no policy and no transport, and not an allowed insecure loopback URL.
    """

    def __init__(self, base_url: str, *, token: str, policy: Any = None,
                 transport: httpx.BaseTransport | None = None, insecure_loopback: bool = False,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT):
        if transport is None:
            if policy is not None:
                from safehold.client.records import attesting_transport

                transport = attesting_transport(policy)
            elif insecure_loopback and is_loopback_http(base_url):
                warnings.warn("discovery: plain HTTP to a loopback service: the service is NOT "
                              "attested (development only)", stacklevel=2)
                transport = httpx.HTTPTransport()
            else:
                raise ValueError("DiscoveryClient needs an appraisal policy or a transport "
                                 "(plain HTTP only with insecure_loopback=True to a loopback URL)")
        self._http = httpx.Client(base_url=base_url, transport=transport, timeout=timeout,
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> DiscoveryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = self._http.post(path, json=body)
        _raise_for(resp)
        return resp.json()

    def info(self) -> dict[str, Any]:
        """The service's public facts (suite, OPRF public key, limits, registrations)."""
        resp = self._http.get("/v1/discovery/info")
        _raise_for(resp)
        return resp.json()

    # -- registration ----------------------------------------------------------------------------

    def register(self, entries: Iterable[tuple[str, str, str]], *, region: str | None = None,
                 progress: Progress | None = None) -> int:
        """Register ``(kind, identifier, user id)`` entries in batches; returns the count.

        Raises:
            InvalidIdentifierError / InvalidUserIdError (checked here first, naming the entry),
            DiscoveryClientError.
        """
        items = []
        for n, (kind, ident, user) in enumerate(entries):
            try:
                items.append({"kind": kind, "identifier": normalise(kind, ident, region),
                              "user_id": user})
                check_user_id(user)
            except ValueError as e:
                raise type(e)(f"entry {n}: {e}") from None
        done = 0
        for i in range(0, len(items), MAX_REGISTER_BATCH):
            done += int(self._post("/v1/discovery/register",
                                   {"entries": items[i : i + MAX_REGISTER_BATCH]})["registered"])
            if progress:
                progress(min(i + MAX_REGISTER_BATCH, len(items)), len(items))
        return done

    def unregister(self, entries: Iterable[tuple[str, str]], *, region: str | None = None) -> int:
        """Remove registrations; returns how many existed."""
        items = [{"kind": k, "identifier": normalise(k, i, region)} for k, i in entries]
        removed = 0
        for i in range(0, len(items), MAX_REGISTER_BATCH):
            removed += int(self._post("/v1/discovery/unregister",
                                      {"entries": items[i : i + MAX_REGISTER_BATCH]})["removed"])
        return removed

    # -- OPRF ------------------------------------------------------------------------------------

    def outputs(self, identifiers: Sequence[tuple[str, str]], *,
                progress: Progress | None = None) -> list[bytes]:
        """OPRF outputs of canonical ``(kind, identifier)`` pairs via Blind → evaluate → Finalize.

        Raises:
            InvalidIdentifierError, RateLimitedError (evaluation budget), DiscoveryClientError,
            OPRFError (the service sent an invalid element).
        """
        inputs = [oprf_input(k, i) for k, i in identifiers]
        out: list[bytes] = []
        for s in range(0, len(inputs), EVALUATE_BATCH):
            chunk = inputs[s : s + EVALUATE_BATCH]
            b = oprf.blind(chunk)
            body = self._post("/v1/discovery/evaluate", {"blinded": pack(b.elements, ELEMENT_SIZE)})
            evaluated = unpack(body.get("evaluated"), ELEMENT_SIZE, what="evaluated")
            if len(evaluated) != len(chunk):
                raise DiscoveryClientError("the service evaluated a different number of elements")
            out += oprf.finalize(chunk, b.blinds, evaluated)
            if progress:
                progress(s + len(chunk), len(inputs))
        return out

    # -- query -----------------------------------------------------------------------------------

    def query(self, identifiers: Iterable[tuple[str, str]], *, region: str | None = None,
              state: QueryState | None = None, progress: Progress | None = None) -> QueryResult:
        """Which identifiers are registered, and to whom.

        Identifiers already in ``state`` are sent as ``prev`` (free), ones in ``state`` but not
        asked now as ``discard``, the rest as ``new`` (charged).

        Raises:
            InvalidIdentifierError (naming the entry), InvalidRequestError (more than
            :data:`MAX_QUERY`), RateLimitedError, InvalidTokenError (a stale state: start
            again with an empty one), DiscoveryClientError.
        """
        state = state or QueryState()
        wanted: list[tuple[str, str]] = []
        seen: set[tuple[str, str]] = set()
        for n, (kind, ident) in enumerate(identifiers):
            try:
                key = (kind, normalise(kind, ident, region))
            except ValueError as e:
                raise type(e)(f"entry {n}: {e}") from None
            if key not in seen:
                seen.add(key)
                wanted.append(key)
        if not wanted or len(wanted) > MAX_QUERY:
            raise InvalidRequestError(f"a query asks about 1..{MAX_QUERY} distinct identifiers")
        names = {key: f"{key[0]}:{key[1]}" for key in wanted}
        fresh = [key for key in wanted if names[key] not in state.asked]
        computed = dict(zip(fresh, self.outputs(fresh, progress=progress), strict=True))
        output = {key: state.asked.get(names[key]) or computed[key] for key in wanted}
        prev_keys = [key for key in wanted if names[key] in state.asked]
        new_keys = fresh
        wanted_names = set(names.values())
        discard = [v for k, v in sorted(state.asked.items()) if k not in wanted_names]
        body = self._post("/v1/discovery/query", {
            "token": pack([state.token], TOKEN_SIZE) if state.token else "",
            "prev": pack([output[k] for k in prev_keys], OUTPUT_SIZE),
            "new": pack([output[k] for k in new_keys], OUTPUT_SIZE),
            "discard": pack(discard, OUTPUT_SIZE)})
        order = prev_keys + new_keys
        raw = base64.b64decode(body["results"], validate=True)
        results = dict(zip(order, decode_results(raw, len(order)), strict=True))
        token = unpack(body["token"], TOKEN_SIZE, what="token", limit=1)
        new_state = QueryState(token[0] if token else None, {names[k]: output[k] for k in wanted})
        return QueryResult({k: results[k] for k in wanted}, int(body["charged"]), int(body["used"]),
                           int(body["limit"]), new_state)
