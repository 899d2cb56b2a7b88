"""The KBS protocol (Trustee RCAR) as the broker serves it: auth, attest, resource release and
certificate issuance to attested keys.

The broker is a Relying Party (RFC 9334): it sends Evidence to the Verifier
(:mod:`safehold.attestation.verifier`) under the manifest workload's appraisal policy, signs the
outcome as an EAR token, and releases a secret only to a key whose Evidence was affirmed under
the current manifest version. Wire shapes: :mod:`safehold.broker.protocol`. Every decision
(affirmed, denied, released, refused) is written to the audit log.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from safehold.attestation.evidence import Evidence
from safehold.attestation.result import issue_ear, verify_ear
from safehold.attestation.verifier import Appraisal
from safehold.broker import protocol
from safehold.broker.audit import Recorder
from safehold.broker.ca import WorkloadCA
from safehold.broker.errors import (
    MalformedRequestError,
    NonceReplayedError,
    NotAuthenticatedError,
    NotFoundError,
    PermissionDeniedError,
)
from safehold.broker.installed import Active, InstalledManifest
from safehold.broker.manifest import Manifest
from safehold.broker.sessions import Attested, SessionTable
from safehold.broker.state import BrokerState
from safehold.errors import AttestationError, AttestationResultError, EvidenceFormatError
from safehold.jsontypes import JSONObject

#: The KBS protocol major version this broker speaks (a Request's ``version`` must match).
PROTOCOL_MAJOR = protocol.PROTOCOL_VERSION.split(".")[0]


class KBS:
    """The KBS endpoints of one ready broker.

    Args:
        state: the unsealed broker state (``value`` and ``keyset`` secrets are read from it).
        installed: the installed manifest.
        sessions: the broker's session table.
        ear_key: the broker's EAR signing key (ES256).
        ca: the workload CA (certificate secrets).
        record: appends an audit entry.
    """

    def __init__(self, state: BrokerState, installed: InstalledManifest, sessions: SessionTable,
                 ear_key: ec.EllipticCurvePrivateKey, ca: WorkloadCA, record: Recorder):
        self._state = state
        self._installed = installed
        self._sessions = sessions
        self._ear_key = ear_key
        self._ca = ca
        self._record = record

    def auth(self, body: object) -> tuple[str, JSONObject]:
        """Handle a KBS *Request*; returns ``(session id, Challenge)``.

        Raises:
            NotReadyError: recovery mode or no manifest.
            MalformedRequestError: malformed Request or unknown TEE / workload.
        """
        m = self._installed.require().manifest
        if not isinstance(body, dict):
            raise MalformedRequestError("KBS Request: expected a JSON object")
        version, tee = body.get("version"), body.get("tee")
        if not isinstance(version, str) or version.split(".")[0] != PROTOCOL_MAJOR:
            raise MalformedRequestError(
                f"KBS Request version: expected {protocol.PROTOCOL_VERSION}, got {version!r:.20}"
            )
        if tee not in protocol.TEE_NAMES:
            raise MalformedRequestError(
                f"KBS Request tee: unknown TEE {tee!r:.30}; known: {sorted(protocol.TEE_NAMES)}"
            )
        extra = body.get("extra-params", {})
        if extra in ("", None):
            extra = {}
        if not isinstance(extra, dict):
            raise MalformedRequestError("KBS Request extra-params: expected an object")
        workload = extra.get("workload")
        if workload is not None and workload not in m.workloads:
            raise MalformedRequestError(
                f"KBS Request extra-params.workload: {workload!r:.40} is not in the manifest"
            )
        sid, sess = self._sessions.open(protocol.TEE_NAMES[tee], workload, time.time())
        return sid, {"nonce": sess.nonce, "extra-params": {}}

    def attest(self, sid: str | None, body: object) -> JSONObject:
        """Handle a KBS *Attestation*; returns ``{"token": EAR}``.

        Raises:
            NotReadyError: recovery mode or no manifest.
            NotAuthenticatedError: no/unknown session, nonce used (:class:`NonceReplayedError`)
                or expired, Evidence not authentic or bound to another nonce/key.
            MalformedRequestError: malformed body or Evidence; JWKError: bad ``tee-pubkey``.
            PermissionDeniedError: the appraisal policy refuses the claims (names each failed claim).
        """
        act = self._installed.require()
        m = act.manifest
        now = time.time()
        try:
            sess = self._sessions.claim(sid, now)
        except NonceReplayedError:
            self._record("attest", {"verdict": "denied", "reason": "nonce replayed"})
            raise
        if not isinstance(body, dict):
            raise MalformedRequestError("KBS Attestation: expected a JSON object")
        jwk_obj = body.get("tee-pubkey")
        key = protocol.import_tee_pubkey(jwk_obj)  # JWKError unless a public EC / RSA JWK object
        assert isinstance(jwk_obj, dict)
        ev = body.get("tee-evidence")
        if isinstance(ev, dict | list):
            ev = json.dumps(ev)
        if not isinstance(ev, str):
            raise MalformedRequestError("KBS Attestation tee-evidence: expected a CMW (JSON text or value)")
        evidence = Evidence.from_cmw(ev)  # EvidenceFormatError: malformed
        if evidence.tee_type != sess.tee:
            raise MalformedRequestError(
                f"KBS attest: Request said tee {sess.tee!r}, Evidence is {evidence.tee_type!r}"
            )
        rd = protocol.report_data(sess.nonce, jwk_obj)
        if sess.workload is not None and sess.workload not in m.workloads:
            raise NotAuthenticatedError(
                f"KBS attest: workload {sess.workload!r} is no longer in the manifest "
                f"(version {act.version}); POST /kbs/v0/auth again")
        name, appraisal = self._appraise(act, evidence, rd, [sess.workload] if sess.workload
                                         else sorted(m.workloads))
        tp = protocol.thumbprint(key)
        ttl = self._sessions.token_ttl
        token = issue_ear(appraisal, self._ear_key, submod=name, nonce=tp, ttl=ttl)
        att = Attested(name, key, tp, now + ttl, appraisal.claims.measurement.hex(), act.version)
        self._sessions.bind(sess, att)
        self._record("attest", {"verdict": "affirmed", "workload": name, "tee": evidence.tee_type,
                                "measurement": att.measurement, "key": protocol.b64url(tp),
                                "manifest_version": act.version})
        return {"token": token}

    def _appraise(self, act: Active, evidence: Evidence, rd: bytes,
                  candidates: list[str]) -> tuple[str, Appraisal]:
        """The first candidate workload whose policy affirms ``evidence``, and its appraisal.

        The report_data binding (nonce + tee-pubkey of *this* session) is checked before any
        policy's claims count: it does not depend on the workload, so Evidence that fails it is
        stale, replayed or relayed — 401 whether a workload was named or every one is tried.

        Refusals sent to the caller name the failed claims only, never a value of the manifest:
        reference values, TCB minimums and the expected binding stay in the broker, and the full
        expected-vs-got list goes to the audit log (readable by manifest users). An unnamed
        attempt does not learn which workloads exist either.

        Raises:
            MalformedRequestError: the Evidence is malformed.
            NotAuthenticatedError: not authentic, or the report_data binding fails (stale,
                replayed or relayed Evidence).
            PermissionDeniedError: every candidate's policy refuses the claims.
        """
        failures: dict[str, list[tuple[str, str, str]]] = {}
        for name in candidates:
            try:
                appraisal = act.verifiers[name].evaluate(evidence, expected_report_data=rd)
            except EvidenceFormatError as e:
                raise MalformedRequestError(f"KBS attest: {e}") from None
            except AttestationError as e:
                self._record("attest", {"verdict": "denied", "reason": str(e)})
                raise NotAuthenticatedError(f"KBS attest: Evidence is not authentic: {e}") from None
            bad = appraisal.failures
            if any(v.claim == "report_data" for v in bad):
                self._record("attest", {"verdict": "denied", "reason": "report_data binding",
                                        "workloads": {name: [list(v.as_tuple()) for v in bad]}})
                raise NotAuthenticatedError(
                    "KBS attest: Evidence report_data does not bind this session's nonce and "
                    "tee-pubkey (stale, replayed or relayed Evidence); POST /kbs/v0/auth and "
                    "attest with fresh Evidence")
            if appraisal.ok:
                return name, appraisal
            failures[name] = [v.as_tuple() for v in bad]
        self._record("attest", {"verdict": "denied",
                                "workloads": {k: [list(f) for f in v] for k, v in failures.items()}})
        claims = ", ".join(sorted({c for fs in failures.values() for c, _, _ in fs}))
        if len(candidates) == 1:
            why = f"the appraisal policy of workload {candidates[0]!r} refuses the Evidence"
        else:
            why = "no workload's appraisal policy accepts the Evidence"
        raise PermissionDeniedError(f"KBS attest: {why}; failed claim(s): {claims} (expected "
                                    "vs. got are in the broker's audit log)")

    def _attested(self, sid: str | None, bearer: str | None, act: Active) -> Attested:
        """The attestation behind a cookie or EAR bearer token, valid under manifest ``act``.

        Raises:
            NotAuthenticatedError: none, expired, forged, or made under another manifest version
                or for a workload ``act`` no longer has.
        """
        now = time.time()
        if bearer:
            try:
                claims = verify_ear(bearer, self._ear_key.public_key(), accept_warning=True)
            except AttestationResultError as e:
                raise NotAuthenticatedError(f"EAR token refused: {e}") from None
            found = self._sessions.by_thumbprint(protocol.unb64url(str(claims.get("eat_nonce", ""))))
            if found is None or found.workload not in claims.get("submods", {}):
                raise NotAuthenticatedError(
                    "EAR token is not bound to a key attested at this broker; attest again"
                )
        else:
            found = self._sessions.by_session(sid)
            if found is None:
                raise NotAuthenticatedError("not attested: POST /kbs/v0/auth and /kbs/v0/attest first")
        att = found
        if att.expires < now:
            raise NotAuthenticatedError("attestation expired: attest again")
        if att.manifest_version != act.version:
            raise NotAuthenticatedError(f"attested under manifest version {att.manifest_version}, "
                                        f"current is {act.version}: attest again")
        if att.workload not in act.manifest.workloads:  # cannot happen with equal versions; fail closed
            raise NotAuthenticatedError(
                f"workload {att.workload!r} is not in manifest version {act.version}: attest again")
        return att

    def resource(self, sid: str | None, bearer: str | None, repository: str, rtype: str,
                 tag: str) -> JSONObject:
        """Release ``<repository>/<type>/<tag>`` as a JWE to the attested ``tee-pubkey``.

        Raises:
            NotReadyError; NotAuthenticatedError (not attested); NotFoundError (no such resource,
            or a value not supplied yet); PermissionDeniedError (the workload may not read it).
        """
        act = self._installed.require()
        m = act.manifest
        att = self._attested(sid, bearer, act)
        path = f"{repository}/{rtype}/{tag}"
        spec = m.secrets.get(tag)
        if repository != m.repository or spec is None or spec.type != rtype:
            self._record("deny", {"resource": path, "workload": att.workload, "reason": "unknown"})
            raise NotFoundError(f"resource {path} does not exist")
        if tag not in m.workloads[att.workload].secrets:
            self._record("deny", {"resource": path, "workload": att.workload, "reason": "not allowed"})
            raise PermissionDeniedError(f"workload {att.workload!r} may not read {path} (manifest)")
        if spec.type == "certificate":
            plaintext = self._issue(m, att, spec.name, [])
        elif spec.type == "access":  # the owner's pinned role table, straight from the manifest
            plaintext = spec.access_document()
        else:
            got = self._state.get("secret", spec.name)
            if got is None:
                self._record("deny", {"resource": path, "workload": att.workload, "reason": "no value"})
                raise NotFoundError(f"resource {path} has no value yet (an operator must supply it)")
            plaintext = got[0]
        self._record("release", {"resource": path, "workload": att.workload})
        return protocol.encrypt_response(plaintext, att.key)

    def certificate(self, sid: str | None, bearer: str | None, name: str, body: object) -> JSONObject:
        """Issue the certificate secret ``name`` to the attested key, with requested extensions.

        ``body``: ``{"extensions": [{"oid": "2.23.133.5.4.9", "value": "<base64url DER>"}]}``.
        Returns ``{"certificate": PEM, "ca": PEM}``.

        Raises:
            as :meth:`resource`; MalformedRequestError for a bad body, CertificateRequestError for
            an extension that is not allowed.
        """
        act = self._installed.require()
        m = act.manifest
        att = self._attested(sid, bearer, act)
        spec = m.secrets.get(name)
        if spec is None or spec.type != "certificate":
            raise NotFoundError(f"certificate {name!r} is not in the manifest")
        if name not in m.workloads[att.workload].secrets:
            self._record("deny", {"certificate": name, "workload": att.workload, "reason": "not allowed"})
            raise PermissionDeniedError(
                f"workload {att.workload!r} may not obtain certificate {name!r} (manifest)"
            )
        exts: list[tuple[str, bytes]] = []
        if body is not None:
            if not isinstance(body, dict) or not isinstance(body.get("extensions", []), list):
                raise MalformedRequestError("certificate request: expected {\"extensions\": [...]}")
            for e in body.get("extensions", []):
                try:
                    exts.append((str(e["oid"]), protocol.unb64url(e["value"])))
                except (KeyError, TypeError, ValueError):
                    raise MalformedRequestError(
                        "certificate request: each extension needs oid and base64url value"
                    ) from None
        out: dict[str, Any] = json.loads(self._issue(m, att, name, exts))
        return out

    def _issue(self, m: Manifest, att: Attested, name: str, exts: list[tuple[str, bytes]]) -> bytes:
        """Issue certificate secret ``name`` to ``att``'s key: ``{"certificate", "ca"}`` JSON.

        CN = the attested workload, with the attested-workload key purpose (the anchor members
        let only such a certificate write the ledger named by its CN).

        Raises:
            CertificateRequestError: key type or extension refused by the CA.
        """
        spec = m.secrets[name]
        cert = self._ca.issue(att.key.raw_value, common_name=att.workload,
                              dns_names=spec.dns_names, ip_addresses=spec.ip_addresses,
                              validity_days=spec.validity_days, extensions=exts, attested=True)
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        self._record("certificate", {"certificate": name, "workload": att.workload,
                                     "serial": format(cert.serial_number, "x")})
        return json.dumps({"certificate": pem, "ca": self._ca.cert_pem()}).encode()
