"""Client SDK for the gematik VAU channels and the E-Rezept Fachdienst behind them.

* :class:`ErpVauClient` — E-Rezept VAU (gemSpec_Krypt A_20161-01, A_20174, A_20175): fetches the
  VAU certificate and checks it against the owner's pins, encrypts each inner HTTP request,
  decrypts the answer, and keeps the ``Userpseudonym`` for the next request path.
* :class:`ErezeptClient` — the Fachdienst's Task operations over an :class:`ErpVauClient`.
* :class:`EpaVauHttpClient` — ePA 3 VAU (gemSpec_Krypt chapter 7): handshake over ``POST /VAU``
  and the ``VAU-CID`` path, then encrypted requests; a non-200 outer answer ends the channel
  (A_24767) and the next request handshakes again.

No web-framework or server module is imported here; the protocol state lives in the
framework-free :mod:`safehold.vau.erp` / :mod:`safehold.vau.epa`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from safehold.client.errors import ErezeptResponseError, VauOuterError
from safehold.jsontypes import JSONObject
from safehold.vau.epa_client import EpaVauClient
from safehold.vau.epa_keys import VauKeyTrust
from safehold.vau.erp import seal_request
from safehold.vau.errors import VauFormatError, VauKeyVerificationError
from safehold.vau.httpmsg import HttpRequest, HttpResponse, parse_response

__all__ = ["AttestedVauKeyTrust", "EpaVauHttpClient", "ErezeptClient", "ErpVauClient"]


def _cert_key(der: bytes) -> ec.EllipticCurvePublicKey:
    key = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.BrainpoolP256R1):
        raise VauFormatError("VAU certificate key is not a brainpoolP256r1 EC key")
    return key


def _subject(access_token: str) -> str:
    """The token's ``sub`` (unverified; only to keep one pseudonym per user), else a hash."""
    try:
        payload = access_token.split(".")[1]
        sub = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))).get("sub")
        if isinstance(sub, str):
            return sub
    except (IndexError, ValueError, AttributeError):
        pass
    return hashlib.sha256(access_token.encode()).hexdigest()


class ErpVauClient:
    """Speaks the E-Rezept VAU protocol to one Fachdienst.

    Args:
        base_url: the Fachdienst's outer URL (``https://…``; ``http://127.0.0.1…`` for tests).
        pinned_certificates: SHA-256 (hex) of the VAU certificates the owner trusts; the
            certificate from ``GET /VAUCertificate`` must be one of them. (A TI client validates
            it against the TSL instead; Safehold pins.)
        http: an httpx client to use (TLS settings, timeouts); a new one by default.
        user: the ``X-erp-user`` header, ``l`` (care provider) or ``v`` (insured person).
    """

    def __init__(
        self,
        base_url: str,
        *,
        pinned_certificates: Iterable[str],
        http: httpx.Client | None = None,
        user: str = "l",
    ):
        self.base_url = base_url.rstrip("/")
        self.pins = {p.lower() for p in pinned_certificates}
        if not self.pins:
            raise VauKeyVerificationError("no VAU certificate pinned; refusing to encrypt to an unknown key")
        self.http = http or httpx.Client(timeout=30.0)
        self.user = user
        self._pseudonyms: dict[str, str] = {}
        self._key: ec.EllipticCurvePublicKey | None = None
        self._who: tuple[str, str] = ("", "")  # (token, its sub): decoded once per token

    def __repr__(self) -> str:
        return f"ErpVauClient({self.base_url!r})"

    def close(self) -> None:
        """Close the HTTP client."""
        self.http.close()

    def vau_public_key(self) -> ec.EllipticCurvePublicKey:
        """Fetch (once) and check the VAU certificate; return its key.

        Raises:
            VauKeyVerificationError: the certificate is not pinned.
            VauOuterError: the endpoint failed.
        """
        if self._key is None:
            r = self.http.get(self.base_url + "/VAUCertificate")
            if r.status_code != 200:
                raise VauOuterError(r.status_code, r.text)
            if hashlib.sha256(r.content).hexdigest() not in self.pins:
                raise VauKeyVerificationError("VAU certificate from the server is not among the pinned ones")
            self._key = _cert_key(r.content)
        return self._key

    def request(
        self,
        access_token: str,
        method: str,
        target: str,
        *,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
    ) -> HttpResponse:
        """Send one inner HTTP request through the VAU and return the inner response.

        Raises:
            VauOuterError: the outer answer was not 200 (the client never decrypts it).
            VauDecryptionError / VauResponseError / VauFormatError: the answer does not belong
                to this request or does not authenticate.
        """
        hs = [("Host", "erp.zentral.erp.splitdns.ti-dienste.de"), *headers]
        sealed = seal_request(self.vau_public_key(), access_token, HttpRequest(method, target, hs, body))
        resource = target.lstrip("/").split("/")[0].split("?")[0]
        if self._who[0] != access_token:
            self._who = (access_token, _subject(access_token))
        who = self._who[1]
        r = self.http.post(
            f"{self.base_url}/VAU/{quote(self._pseudonyms.get(who, '0'), safe='')}",
            content=sealed.body,
            headers={
                "Content-Type": "application/octet-stream",
                "X-erp-user": self.user,
                "X-erp-resource": resource,
            },
        )
        if r.status_code != 200:
            raise VauOuterError(r.status_code, r.text)
        response = sealed.open_response(r.content, request_method=method)
        self._pseudonyms[who] = r.headers.get("Userpseudonym") or "0"  # A_20175, kept per user
        return response

    def user_pseudonym(self, access_token: str) -> str:
        """The stored Userpseudonym for the user of ``access_token`` (``0`` if none yet)."""
        return self._pseudonyms.get(_subject(access_token), "0")


class ErezeptClient:
    """The E-Rezept Task operations (FHIR R4) through an :class:`ErpVauClient`."""

    def __init__(self, vau: ErpVauClient):
        self.vau = vau

    def _call(
        self,
        token: str,
        method: str,
        target: str,
        body: Any = None,
        *,
        headers: Iterable[tuple[str, str]] = (),
        ok: int = 200,
    ) -> Any:
        data = b"" if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        hs = [("Accept", "application/fhir+json"), *headers]
        if body is not None:
            hs.append(("Content-Type", "application/fhir+json"))
        r = self.vau.request(token, method, target, body=data, headers=hs)
        parsed = json.loads(r.body) if r.body else None
        if r.status != ok:
            raise ErezeptResponseError(r.status, parsed)
        return parsed

    def create(self, token: str, flow_type: str = "160") -> JSONObject:
        """``$create``: the draft Task (with PrescriptionID and AccessCode)."""
        body = {
            "resourceType": "Parameters",
            "parameter": [
                {
                    "name": "workflowType",
                    "valueCoding": {
                        "system": "https://gematik.de/fhir/erp/CodeSystem/GEM_ERP_CS_FlowType",
                        "code": flow_type,
                    },
                }
            ],
        }
        return self._call(token, "POST", "/Task/$create", body, ok=201)

    def activate(
        self, token: str, task_id: str, access_code: str, signed_prescription: bytes
    ) -> JSONObject:
        """``$activate`` with the CMS-signed KBV bundle."""
        body = {
            "resourceType": "Parameters",
            "parameter": [
                {
                    "name": "ePrescription",
                    "resource": {
                        "resourceType": "Binary",
                        "contentType": "application/pkcs7-mime",
                        "data": base64.b64encode(signed_prescription).decode("ascii"),
                    },
                }
            ],
        }
        return self._call(
            token, "POST", f"/Task/{task_id}/$activate", body, headers=[("X-AccessCode", access_code)]
        )

    def accept(self, token: str, task_id: str, access_code: str) -> JSONObject:
        """``$accept``: Bundle with the Task (Secret) and the signed prescription."""
        return self._call(token, "POST", f"/Task/{task_id}/$accept?ac={quote(access_code)}")

    def reject(self, token: str, task_id: str, secret: str) -> None:
        """``$reject``."""
        self._call(token, "POST", f"/Task/{task_id}/$reject?secret={quote(secret)}", ok=204)

    def close(self, token: str, task_id: str, secret: str, dispense: JSONObject) -> JSONObject:
        """``$close`` with a MedicationDispense: the receipt Bundle."""
        return self._call(token, "POST", f"/Task/{task_id}/$close?secret={quote(secret)}", dispense)

    def abort(
        self, token: str, task_id: str, *, access_code: str | None = None, secret: str | None = None
    ) -> None:
        """``$abort`` (prescriber with AccessCode, insured, pharmacy with Secret)."""
        target = f"/Task/{task_id}/$abort" + (f"?secret={quote(secret)}" if secret else "")
        headers = [("X-AccessCode", access_code)] if access_code else []
        self._call(token, "POST", target, headers=headers, ok=204)

    def tasks(self, token: str) -> JSONObject:
        """``GET /Task``: the insured person's Tasks (searchset Bundle)."""
        return self._call(token, "GET", "/Task")


class AttestedVauKeyTrust(VauKeyTrust):
    """ePA 3 VAU key trust for a VAU reached over an **attested** channel (RA-TLS): the AUT-VAU
    certificate named in M2 is fetched from that VAU (``GET /CertData.<hash>-<cdv>``, A_24957) and
    pinned, then every check of :class:`VauKeyTrust` applies. Sound only because ``http``
    appraised the workload it talks to (Safehold's substitute for the TI trust list: the
    certificate is as trustworthy as the measured code that serves it).

    Args:
        http: an httpx client whose transport attests the VAU (``attesting_transport(policy)``).
        base_url: the VAU's URL. skew: tolerated clock difference, seconds.

    Raises (from :meth:`verify`):
        VauKeyVerificationError: the certificate cannot be fetched, or does not hash to M2's
            ``cert_hash``, or a check of :class:`VauKeyTrust` fails.
    """

    def __init__(self, http: httpx.Client, base_url: str, *, skew: float = 300.0) -> None:
        import time

        self._http, self._base = http, base_url.rstrip("/")
        self._certs: dict[bytes, bytes] = {}
        self._clock = time.time
        self.skew = skew
        self.variant = "round3"

    def certificate_hashes(self) -> list[str]:
        """SHA-256 (hex) of the AUT-VAU certificates pinned so far, in the order fetched."""
        return [h.hex() for h in self._certs]

    def verify(self, signed: Any) -> Any:
        if signed.cert_hash not in self._certs:
            import cbor2

            r = self._http.get(f"{self._base}/CertData.{signed.cert_hash.hex()}-{signed.cdv}")
            try:
                cert = cbor2.loads(r.content).get("cert") if r.status_code == 200 else None
            except (ValueError, AttributeError, cbor2.CBORDecodeError):
                cert = None
            if not isinstance(cert, bytes) or hashlib.sha256(cert).digest() != signed.cert_hash:
                raise VauKeyVerificationError("the attested VAU served no AUT-VAU certificate for the "
                                              "hash in M2")
            self._certs[signed.cert_hash] = cert
        return super().verify(signed)


class EpaVauHttpClient:
    """An ePA 3 VAU channel over HTTP.

    Args:
        base_url: the Aktensystem's outer URL.
        certificates: pinned AUT-VAU certificates (DER); see :class:`VauKeyTrust`.
        pu: production flag expected on user data.
        http: an httpx client; a new one by default.
        trust: a ready :class:`VauKeyTrust` instead of ``certificates``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        certificates: Iterable[bytes] = (),
        pu: bool = False,
        http: httpx.Client | None = None,
        trust: VauKeyTrust | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.trust = trust or VauKeyTrust(certificates)
        self.pu = pu
        self.http = http or httpx.Client(timeout=30.0)
        self.channel: EpaVauClient | None = None
        self.cid: str | None = None

    def __repr__(self) -> str:
        return f"EpaVauHttpClient({self.base_url!r}, cid={self.cid!r})"

    def close(self) -> None:
        """Close the HTTP client."""
        self.http.close()

    def _post(self, path: str, body: bytes, media: str) -> httpx.Response:
        r = self.http.post(self.base_url + path, content=body, headers={"Content-Type": media})
        if r.status_code != 200:
            self.channel, self.cid = None, None  # A_24767: any non-200 ends the channel
            raise VauOuterError(r.status_code, r.text)
        return r

    def handshake(self) -> None:
        """Run M1..M4.

        Raises:
            VauOuterError, VauHandshakeError, VauKeyVerificationError, VauFormatError.
        """
        ch = EpaVauClient(self.trust, pu=self.pu)
        r = self._post("/VAU", ch.message1(), "application/cbor")
        cid = r.headers.get("VAU-CID", "")
        import re

        if not re.fullmatch(r"/[A-Za-z0-9/-]*", cid) or len(cid) > 200:
            raise VauFormatError("VAU-CID header is missing or malformed (A_24622)")
        m3 = ch.handle_m2(r.content)
        ch.handle_m4(self._post(cid, m3, "application/cbor").content)
        self.channel, self.cid = ch, cid

    def request(
        self, method: str, target: str, *, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()
    ) -> HttpResponse:
        """Send one inner HTTP request over the channel (handshaking first if needed)."""
        if self.channel is None or self.cid is None:
            self.handshake()
        assert self.channel is not None and self.cid is not None
        msg = self.channel.encrypt_request(
            HttpRequest(method, target, [("Host", "epa"), *headers], body).encode()
        )
        r = self._post(self.cid, msg, "application/octet-stream")
        return parse_response(self.channel.decrypt_response(r.content), request_method=method)
