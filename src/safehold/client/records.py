"""Client SDK for the records service (sync :class:`RecordsClient`, async :class:`AsyncRecordsClient`).

Both speak the native API (docs/records.md) over an **attesting transport** from
:mod:`safehold.ratls`: on every new TLS connection the service's certificate Evidence is
verified and appraised against the caller's policy *before* the first byte of the request is
sent; a service that fails appraisal never sees the request (an ``AttestationError`` is raised).

Records are JSON objects (FHIR R4 ``Patient`` resources or flat records). Errors map to
Safehold exceptions: 404 → :class:`~safehold.errors.RecordNotFoundError`, 409
``record-tampered`` → :class:`~safehold.errors.RecordTamperedError`, 412 →
:class:`PreconditionFailedError`, 401/403 → :class:`AccessDeniedError`, others →
:class:`RecordsClientError`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeVar, Unpack, overload
from urllib.parse import quote

import httpx

from safehold.client.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    PreconditionFailedError,
    RecordsClientError,
)
from safehold.errors import ConfigError, RecordNotFoundError, RecordTamperedError
from safehold.jsontypes import JSONObject, JSONValue

if TYPE_CHECKING:  # the attestation stack loads only when a transport is built
    from safehold.attestation.policy import AppraisalPolicy
    from safehold.attestation.verifier import Appraisal, Verifier
    from safehold.ratls.client import AsyncRATLSTransport, RATLSTransport

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)

class TransportOptions(TypedDict, total=False):
    """Options of the attesting transport (:class:`safehold.ratls.client.RATLSTransport`).

    Attributes:
        client_cert: ``(certificate PEM file, private key PEM file)`` for mutual TLS (a client
            certificate issued by the broker's workload CA).
        expected_nonce: nonce the service's RA-TLS claims must carry.
        at: verification time (None = now).
        limits / retries / http2: as for :class:`httpx.HTTPTransport`.
    """

    client_cert: tuple[str | PathLike[str], str | PathLike[str]] | None
    expected_nonce: bytes | None
    at: datetime | None
    limits: httpx.Limits
    retries: int
    http2: bool


@dataclass(frozen=True)
class AuditSegment:
    """An exported access-audit segment (:meth:`RecordsClient.audit_segment`).

    Attributes:
        data: the NDJSON bytes, one stored entry per line.
        first: the first entry number in it.
        last: the last entry number in it.
        sha256: hex SHA-256 of ``data`` (checked on receipt), the value ``audit_seal`` names.
    """

    data: bytes
    first: int
    last: int
    sha256: str


@dataclass(frozen=True)
class Record:
    """A record read from the service: ``id``, ``data`` (the JSON object), ``version`` (int,
    from 1; None only from a search against a service too old to report versions)."""

    id: str
    data: JSONObject
    version: int | None


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        if body.get("resourceType") == "OperationOutcome":  # /fhir errors
            issue = (body.get("issue") or [{}])[0]
            code, detail = str(issue.get("code", "")), str(issue.get("diagnostics", ""))
        else:
            code, detail = str(body.get("error", "")), str(body.get("detail", ""))
    except (ValueError, AttributeError, TypeError, IndexError):
        code, detail = "", resp.text[:200]
    msg = f"records service: HTTP {resp.status_code} {code}: {detail}".rstrip(": ")
    s = resp.status_code
    if s == 404 and code != "no-such-endpoint":
        raise RecordNotFoundError(msg)
    if s == 409 and code == "record-tampered":
        raise RecordTamperedError(msg)
    if s == 409 and code == "exists":
        raise AlreadyExistsError(msg, s, code)
    if s == 412:
        raise PreconditionFailedError(msg, s, code)
    if s in (401, 403):
        raise AccessDeniedError(msg, s, code)
    raise RecordsClientError(msg, s, code)


def _version(resp: httpx.Response) -> int:
    etag = resp.headers.get("etag", "").removeprefix("W/").strip('"')
    return int(etag) if etag.isdigit() else 0


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _segment(rid: str) -> str:
    """``rid`` percent-encoded as one URL path segment.

    Raises:
        RecordsClientError: (code ``invalid``, nothing sent) for ``""``, ``"."`` and ``".."``:
            no URL can address them — an empty segment names the collection, and dot segments
            are removed before sending (RFC 3986 §5.2.4), so ``GET .`` would read the id list
            and ``DELETE ""`` hit the collection. The service refuses these ids too
            (``records.model.check_record_id``); its wording is reused.
    """
    if rid in (".", ".."):
        raise RecordsClientError("record id may not be '.' or '..' (URL dot segments)", 0, "invalid")
    if not rid:
        raise RecordsClientError("record id must be 1..128 characters long (got 0)", 0, "invalid")
    return quote(rid, safe="")


def _path(rid: str) -> str:
    return f"/v1/patients/{_segment(rid)}"


#: A batch item: ``(id, record)`` or the wire shape ``{"id": id, "record": record}``.
BatchItem = tuple[str, Mapping[str, Any]] | Mapping[str, Any]


def _batch_body(items: Iterable[BatchItem]) -> dict[str, Any]:
    """``{"records": [{"id", "record"}]}`` from tuples or wire-shape dicts.

    Raises:
        ValueError: an item is neither a 2-tuple nor a mapping with exactly ``id`` and
            ``record`` (names the item's index).
    """
    out = []
    for n, item in enumerate(items):
        if isinstance(item, Mapping):
            if set(item) != {"id", "record"}:
                raise ValueError(f'batch item {n}: a dict item must have exactly the keys "id" and '
                                 f'"record", got {sorted(map(str, item))}')
            rid, rec = item["id"], item["record"]
        elif isinstance(item, tuple | list) and len(item) == 2:
            rid, rec = item
        else:
            raise ValueError(f'batch item {n}: expected (id, record) or {{"id", "record"}}, '
                             f"got {type(item).__name__}")
        out.append({"id": rid, "record": dict(rec) if isinstance(rec, Mapping) else rec})
    return {"records": out}


FHIR_JSON = "application/fhir+json"


def _batch_result(key: str, resp: Mapping[str, Any]) -> dict[str, Any]:
    """A ``batch-response`` entry's ``response`` as ``{"key", "status", "error"?}``."""
    status = str(resp.get("status", ""))
    issues = (resp.get("outcome") or {}).get("issue") or [{}]
    diag = str(issues[0].get("diagnostics", ""))
    if status.startswith("201"):
        return {"key": key, "status": "created"}
    if status.startswith("200"):
        return {"key": key, "status": "unchanged" if diag == "unchanged" else "updated"}
    return {"key": key, "status": "failed", "error": f"HTTP {status}: {diag}".rstrip(": ")}


def _hits(body: dict[str, Any]) -> list[Record]:
    return [Record(x["id"], x["record"], x.get("version")) for x in body["records"]]


T = TypeVar("T")


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One native-API request and how to read its answer, shared by :class:`RecordsClient` and
    :class:`AsyncRecordsClient` (each sends it, raises through :func:`_raise_for`, then parses)."""

    method: str
    url: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, str] | None = None
    content: str | None = None
    body: Any = None  # sent as JSON
    headers: dict[str, str] | None = None


def _entries(r: httpx.Response) -> int:
    return int(r.json()["entries"])


def _list_page_call(cursor: str | None, limit: int) -> _Call[tuple[list[str], str | None]]:
    params = {"limit": str(int(limit))}
    if cursor:
        params["cursor"] = cursor

    def parse(r: httpx.Response) -> tuple[list[str], str | None]:
        body = r.json()
        return list(body["ids"]), body.get("next")
    return _Call("GET", "/v1/patients", parse, params=params)


def _fhir_read_call(rtype: str, rid: str) -> _Call[Record]:
    return _Call("GET", f"/fhir/{quote(rtype, safe='')}/{_segment(rid)}",
                 lambda r: Record(rid, r.json(), _version(r)), headers={"Accept": FHIR_JSON})


def _fhir_batch_call(resources: Iterable[tuple[str, str, Mapping[str, Any]]]) -> _Call[list[dict[str, Any]]]:
    items = list(resources)
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": dict(res), "request": {"method": "PUT", "url": f"{t}/{quote(i, safe='')}"}}
        for t, i, res in items]}
    return _Call("POST", "/fhir/", lambda r: [
        _batch_result(f"{t}/{i}", e.get("response", {}))
        for (t, i, _), e in zip(items, r.json().get("entry", []), strict=True)],
        content=json.dumps(bundle), headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON})


def _audit_verify_call(full: bool) -> _Call[int]:
    return _Call("GET", "/v1/audit/verify", _entries, params={"full": "true"} if full else None)


def _audit_segment_call(through: int) -> _Call[AuditSegment]:
    def parse(r: httpx.Response) -> AuditSegment:
        first, _, last = r.headers.get("X-Safehold-Segment", "").partition("-")
        seg = AuditSegment(r.content, int(first), int(last), r.headers.get("X-Safehold-Segment-SHA256", ""))
        if hashlib.sha256(seg.data).hexdigest() != seg.sha256:
            raise RecordTamperedError("audit segment: the body's SHA-256 is not the one the service named")
        return seg
    return _Call("GET", "/v1/audit/segment", parse, params={"through": str(int(through))})


def _audit_seal_call(through: int, sha256: str) -> _Call[tuple[int, int, str]]:
    def parse(r: httpx.Response) -> tuple[int, int, str]:
        doc = r.json()
        return int(doc["first"]), int(doc["last"]), str(doc["sha256"])
    return _Call("POST", "/v1/audit/seal", parse, body={"through": int(through), "sha256": sha256})


_AUDIT_RESEAL: _Call[int] = _Call("POST", "/v1/audit/reseal", _entries)


@overload
def attesting_transport(policy: AppraisalPolicy | Verifier | str | PathLike[str], *,
                        asynchronous: Literal[False] = False,
                        **kw: Unpack[TransportOptions]) -> RATLSTransport: ...


@overload
def attesting_transport(policy: AppraisalPolicy | Verifier | str | PathLike[str], *,
                        asynchronous: Literal[True],
                        **kw: Unpack[TransportOptions]) -> AsyncRATLSTransport: ...


def attesting_transport(policy: AppraisalPolicy | Verifier | str | PathLike[str], *,
                        asynchronous: bool = False,
                        **kw: Unpack[TransportOptions]) -> RATLSTransport | AsyncRATLSTransport:
    """Build the RA-TLS verifying httpx transport (:mod:`safehold.ratls.client`) for ``policy``.

    Args:
        policy: an :class:`~safehold.attestation.policy.AppraisalPolicy`, a
            :class:`~safehold.attestation.verifier.Verifier`, or the path of a policy TOML file.
        asynchronous: return the async transport.
        kw: :class:`TransportOptions` (``client_cert`` for mutual TLS, ``limits``,
            ``expected_nonce``, ``at``).

    Raises:
        ConfigError: the policy file cannot be read or is invalid, or the client certificate
            does not load.
    """
    from safehold.attestation.policy import AppraisalPolicy
    from safehold.attestation.verifier import Verifier
    from safehold.errors import RATLSError
    from safehold.ratls.client import AsyncRATLSTransport, RATLSTransport

    if isinstance(policy, str | PathLike):
        policy = AppraisalPolicy.from_toml(Path(policy))
    verifier = policy if isinstance(policy, Verifier) else Verifier(policy)
    try:
        if asynchronous:
            return AsyncRATLSTransport(verifier, **kw)
        return RATLSTransport(verifier, **kw)
    except RATLSError as e:
        raise ConfigError(str(e)) from None


class RecordsClient:
    """Synchronous client.

    Args:
        base_url: ``https://host:port`` of the native API.
        token: bearer token (from ``safehold up`` / the broker's access list), or None when a
            client certificate is used.
        policy: appraisal policy for the service's Evidence; required unless ``transport``
            is given (tests and the benchmark's plaintext baseline pass their own).
        transport: an httpx transport to use instead (must itself verify the service).
        transport_kw: e.g. ``client_cert=(cert.pem, key.pem)`` for mutual TLS with a client
            certificate from the broker (then ``token`` may be None); see
            :func:`attesting_transport`.

    Raises:
        ValueError: neither ``policy`` nor ``transport`` given.
    """

    def __init__(self, base_url: str, *, token: str | None = None,
                 policy: AppraisalPolicy | Verifier | str | PathLike[str] | None = None,
                 transport: httpx.BaseTransport | None = None, timeout: httpx.Timeout = DEFAULT_TIMEOUT,
                 **transport_kw: Unpack[TransportOptions]) -> None:
        if transport is None:
            if policy is None:
                raise ValueError("RecordsClient needs an appraisal policy (or an attesting transport)")
            transport = attesting_transport(policy, **transport_kw)
        self._transport = transport
        self._http = httpx.Client(base_url=base_url, transport=transport, timeout=timeout,
                                  headers=_headers(token))

    @property
    def appraisal(self) -> Appraisal | None:
        """The Attestation appraisal of the most recent connection (None before the first, and
        None with a ``transport`` that does not attest)."""
        appraisal: Appraisal | None = getattr(self._transport, "last_appraisal", None)
        return appraisal

    def close(self) -> None:
        """Close connections."""
        self._http.close()

    def __enter__(self) -> RecordsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, rid: str, record: Mapping[str, JSONValue], *, if_version: int | None = None,
            create_only: bool = False) -> int:
        """Create or replace ``rid``; returns the new version.

        Args:
            if_version: compare-and-set on this version (0 = must not exist).
            create_only: fail with :class:`AlreadyExistsError` if ``rid`` exists.
        """
        h = {}
        if if_version is not None:
            h["If-Match"] = f'"{if_version}"'
        if create_only:
            h["If-None-Match"] = "*"
        r = self._http.put(_path(rid), json=dict(record), headers=h)
        _raise_for(r)
        return int(r.json()["version"])

    def get(self, rid: str) -> Record:
        """Read ``rid``. Raises RecordNotFoundError, RecordTamperedError."""
        r = self._http.get(_path(rid))
        _raise_for(r)
        return Record(rid, r.json(), _version(r))

    def delete(self, rid: str, *, if_version: int | None = None) -> None:
        """Delete ``rid``. Raises RecordNotFoundError, PreconditionFailedError."""
        h = {"If-Match": f'"{if_version}"'} if if_version is not None else {}
        _raise_for(self._http.delete(_path(rid), headers=h))

    def list_page(self, *, cursor: str | None = None, limit: int = 100) -> tuple[list[str], str | None]:
        """One page of record ids and the next cursor (None at the end)."""
        return self._send(_list_page_call(cursor, limit))

    def list_ids(self, *, page: int = 500) -> Iterator[str]:
        """Every record id, paging as needed."""
        cursor = None
        while True:
            ids, cursor = self.list_page(cursor=cursor, limit=page)
            yield from ids
            if not cursor:
                return

    def search(self, *, limit: int = 100, **criteria: str) -> list[Record]:
        """Exact-match search, e.g. ``search(family="Doe", birthDate="1970-01-01")``; at most
        ``limit`` (1..1000) records, in id order, each with its current ``version``."""
        r = self._http.get("/v1/patients", params={**criteria, "limit": limit})
        _raise_for(r)
        return _hits(r.json())

    def batch(self, items: Iterable[BatchItem]) -> list[JSONObject]:
        """Upsert up to 500 records; identical ones are left alone (status ``unchanged``).

        Args:
            items: ``(id, record)`` tuples or wire-shape dicts ``{"id": …, "record": {…}}``
                (mixed is fine).

        Returns one ``{"id", "status", ...}`` per item (status created|updated|unchanged|failed).

        Raises:
            ValueError: an item has neither shape (nothing is sent).
            RecordsClientError: the service refused the batch (e.g. 400 naming the item, 413).
        """
        r = self._http.post("/v1/patients:batch", content=json.dumps(_batch_body(items)),
                            headers={"Content-Type": "application/json"})
        _raise_for(r)
        return list(r.json()["results"])

    def fhir_read(self, rtype: str, rid: str) -> Record:
        """Read a FHIR resource (``GET /fhir/<type>/<id>``); ``version`` from its ETag.
        Raises RecordNotFoundError, RecordTamperedError."""
        return self._send(_fhir_read_call(rtype, rid))

    def fhir_batch(self, resources: Iterable[tuple[str, str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """Store FHIR resources with their ids: one ``batch`` Bundle of ``PUT <type>/<id>``
        entries to ``POST /fhir/`` (FHIR R4 §3.1.0.11; not atomic, at most 500).

        Args:
            resources: ``(type, id, resource)``.

        Returns one ``{"key": "<type>/<id>", "status": created|updated|unchanged|failed,
        "error"?}`` per resource, in order.

        Raises:
            RecordsClientError: the service refused the whole Bundle (e.g. 400, 413).
        """
        return self._send(_fhir_batch_call(resources))

    def audit_verify(self) -> int:
        """(admin) verify the service's audit chain and its authenticated head; returns the
        number of entries. Raises RecordsClientError (409 ``audit-chain-broken``) naming the
        break, e.g. a tail cut off behind the head."""
        return self._send(_audit_verify_call(full=False))

    def audit_reseal(self) -> int:
        """(admin) accept the audit log as it now is after a failed head check (the service
        appends an entry recording what was wrong); returns the number of entries."""
        return self._send(_AUDIT_RESEAL)

    def audit_verify_full(self) -> int:
        """(admin) :meth:`audit_verify` walking the whole live chain from its base instead of
        from the last verified checkpoint (``GET /v1/audit/verify?full=true``)."""
        return self._send(_audit_verify_call(full=True))

    def audit_segment(self, through: int) -> AuditSegment:
        """(admin) export the oldest live access-audit entries through entry ``through`` for
        retention (``GET /v1/audit/segment``): NDJSON of the stored entries (blind indexes,
        principals, outcomes, MACs: no record content). Nothing is dropped until
        :meth:`audit_seal` names the export's SHA-256.

        Raises:
            RecordsClientError: 409 ``audit-segment-refused`` (``through`` not sealable: before
                the base or at/after the newest entry, which stays live); 409
                ``audit-chain-broken`` (the chain is broken).
            RecordTamperedError: the body's SHA-256 is not the one the service named.
        """
        return self._send(_audit_segment_call(through))

    def audit_seal(self, through: int, sha256: str) -> tuple[int, int, str]:
        """(admin) drop the exported segment through ``through`` from the live log, keeping its
        signed digest in the chain (``POST /v1/audit/seal``); ``sha256``: hex SHA-256 of the
        export kept elsewhere. Returns ``(first, last, sha256)`` of the sealed segment.

        Raises:
            RecordsClientError: 409 ``audit-segment-refused`` when the live segment's digest is
                not ``sha256`` (the log changed since the export, or another export was named).
        """
        return self._send(_audit_seal_call(through, sha256))

    def _send(self, c: _Call[T]) -> T:
        r = self._http.request(c.method, c.url, params=c.params, content=c.content, json=c.body,
                               headers=c.headers)
        _raise_for(r)
        return c.parse(r)


class AsyncRecordsClient:
    """Asynchronous client; same methods as :class:`RecordsClient`, as coroutines."""

    def __init__(self, base_url: str, *, token: str | None = None,
                 policy: AppraisalPolicy | Verifier | str | PathLike[str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT, **transport_kw: Unpack[TransportOptions]) -> None:
        if transport is None:
            if policy is None:
                raise ValueError("AsyncRecordsClient needs an appraisal policy (or an attesting transport)")
            transport = attesting_transport(policy, asynchronous=True, **transport_kw)
        self._http = httpx.AsyncClient(base_url=base_url, transport=transport, timeout=timeout,
                                       headers=_headers(token))

    async def aclose(self) -> None:
        """Close connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRecordsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def put(self, rid: str, record: Mapping[str, JSONValue], *, if_version: int | None = None,
                  create_only: bool = False) -> int:
        """See :meth:`RecordsClient.put`."""
        h = {}
        if if_version is not None:
            h["If-Match"] = f'"{if_version}"'
        if create_only:
            h["If-None-Match"] = "*"
        r = await self._http.put(_path(rid), json=dict(record), headers=h)
        _raise_for(r)
        return int(r.json()["version"])

    async def get(self, rid: str) -> Record:
        """See :meth:`RecordsClient.get`."""
        r = await self._http.get(_path(rid))
        _raise_for(r)
        return Record(rid, r.json(), _version(r))

    async def delete(self, rid: str, *, if_version: int | None = None) -> None:
        """See :meth:`RecordsClient.delete`."""
        h = {"If-Match": f'"{if_version}"'} if if_version is not None else {}
        _raise_for(await self._http.delete(_path(rid), headers=h))

    async def list_ids(self, *, page: int = 500) -> AsyncIterator[str]:
        """See :meth:`RecordsClient.list_ids`."""
        cursor = None
        while True:
            ids, cursor = await self.list_page(cursor=cursor, limit=page)
            for i in ids:
                yield i
            if not cursor:
                return

    async def list_page(self, *, cursor: str | None = None, limit: int = 100) -> tuple[list[str], str | None]:
        """See :meth:`RecordsClient.list_page`."""
        return await self._send(_list_page_call(cursor, limit))

    async def search(self, *, limit: int = 100, **criteria: str) -> list[Record]:
        """See :meth:`RecordsClient.search`."""
        r = await self._http.get("/v1/patients", params={**criteria, "limit": limit})
        _raise_for(r)
        return _hits(r.json())

    async def batch(self, items: Iterable[BatchItem]) -> list[JSONObject]:
        """See :meth:`RecordsClient.batch`."""
        r = await self._http.post("/v1/patients:batch", content=json.dumps(_batch_body(items)),
                                  headers={"Content-Type": "application/json"})
        _raise_for(r)
        return list(r.json()["results"])

    async def fhir_read(self, rtype: str, rid: str) -> Record:
        """See :meth:`RecordsClient.fhir_read`."""
        return await self._send(_fhir_read_call(rtype, rid))

    async def fhir_batch(self, resources: Iterable[tuple[str, str, Mapping[str, Any]]]
                         ) -> list[dict[str, Any]]:
        """See :meth:`RecordsClient.fhir_batch`."""
        return await self._send(_fhir_batch_call(resources))

    async def audit_verify(self) -> int:
        """See :meth:`RecordsClient.audit_verify`."""
        return await self._send(_audit_verify_call(full=False))

    async def audit_reseal(self) -> int:
        """See :meth:`RecordsClient.audit_reseal`."""
        return await self._send(_AUDIT_RESEAL)

    async def audit_verify_full(self) -> int:
        """See :meth:`RecordsClient.audit_verify_full`."""
        return await self._send(_audit_verify_call(full=True))

    async def audit_segment(self, through: int) -> AuditSegment:
        """See :meth:`RecordsClient.audit_segment`."""
        return await self._send(_audit_segment_call(through))

    async def audit_seal(self, through: int, sha256: str) -> tuple[int, int, str]:
        """See :meth:`RecordsClient.audit_seal`."""
        return await self._send(_audit_seal_call(through, sha256))

    async def _send(self, c: _Call[T]) -> T:
        r = await self._http.request(c.method, c.url, params=c.params, content=c.content, json=c.body,
                                     headers=c.headers)
        _raise_for(r)
        return c.parse(r)
