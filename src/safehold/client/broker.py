"""Workload side of the key broker: attest, fetch resources, obtain the workload's certificate.

.. code-block:: python

    from safehold.attestation.attesters.simulated import SimulatedAttester
    from safehold.client.broker import BrokerClient

    with BrokerClient("https://127.0.0.1:8443", SimulatedAttester(data_dir), verify="ca.pem",
                      workload="records") as kbs:
        kbs.attest()                                   # auth → Evidence → EAR token
        keyset = kbs.get_keyset("records-keyset")      # a safehold.crypto.keyset.Keyset
        cert_pem, ca_pem = kbs.get_certificate("records-tls", extensions=[(oid, der)])
        key_pem = kbs.private_key_pem()                # the key the certificate was issued to

The TEE key (``tee-pubkey``) is generated inside the TEE by this client (ECDSA P-256 by default,
or pass ``key=`` an EC P-256/P-384 private key); its public half is bound into the Evidence's
report_data and every secret comes back as a JWE only this key can open. Protocol details:
:mod:`safehold.broker.protocol`.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

from safehold.attestation.attesters.base import Attester
from safehold.broker import protocol
from safehold.client.errors import BrokerRefusedError
from safehold.crypto.keyset import Keyset
from safehold.errors import BrokerError
from safehold.jsontypes import JSONObject


class BrokerClient:
    """A KBS client for one workload.

    Args:
        url: broker base URL, e.g. ``https://127.0.0.1:8443``.
        attester: the TEE's Attester.
        verify: CA bundle path, an ``ssl.SSLContext``, or a bool (httpx semantics).
        workload: manifest workload name to appraise against (``extra-params.workload``).
        key: the TEE key (EC P-256/P-384 private key); None generates one.
        timeout: seconds per request.
    """

    def __init__(self, url: str, attester: Attester, *, verify: str | bool | ssl.SSLContext = True,
                 workload: str | None = None, key: ec.EllipticCurvePrivateKey | None = None,
                 timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.attester = attester
        self.workload = workload
        self._key = key or ec.generate_private_key(ec.SECP256R1())
        self._jwk = ECKey.import_key(self._key)
        if isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        self._verify, self._timeout = verify, timeout
        self._http = httpx.Client(base_url=self.url, verify=verify, timeout=timeout)
        self._bare: httpx.Client | None = None
        self.token: str | None = None

    # --- plumbing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()
        if self._bare is not None:
            self._bare.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                detail = str(r.json().get("detail", r.text))
            except ValueError:
                detail = r.text[:300]
            raise BrokerRefusedError(r.status_code, detail)
        return r

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return self._check(self._http.request(method, path, **kw))
        except httpx.HTTPError as e:
            raise BrokerError(f"broker {self.url} unreachable: {type(e).__name__}: {e}") from None

    # --- protocol ------------------------------------------------------------------------------

    @property
    def tee_pubkey(self) -> JSONObject:
        """The public JWK sent as ``tee-pubkey``."""
        return protocol.public_jwk(self._jwk)

    def attest(self, *, new_key: bool = False) -> str:
        """Run auth + attest; keep the session cookie and return the EAR token.

        Args:
            new_key: generate a fresh TEE key first (the KBS protocol's ``tee-pubkey`` is valid
                until the next attestation; certificates already issued stay bound to the old key).

        Raises:
            BrokerRefusedError: 401 (Evidence not authentic / not bound), 403 (policy refuses,
                naming the failed claims), 400 (malformed).
            BrokerError: the broker is unreachable.
        """
        if new_key:
            self._key = ec.generate_private_key(self._key.curve)
            self._jwk = ECKey.import_key(self._key)
        r = self._request("POST", "/kbs/v0/auth",
                          json=protocol.auth_request(self.attester.tee_type, self.workload))
        nonce = r.json()["nonce"]
        jwk = self.tee_pubkey
        evidence = self.attester.attest(protocol.report_data(nonce, jwk))
        r = self._request("POST", "/kbs/v0/attest", json=protocol.attestation(jwk, evidence.to_cmw()))
        self.token = r.json()["token"]
        return self.token

    def get_resource(self, path: str, *, use_token: bool = False) -> bytes:
        """Fetch ``<repository>/<type>/<tag>`` and decrypt it with the TEE key.

        Args:
            path: e.g. ``"default/keyset/records-keyset"``.
            use_token: authenticate with the EAR token as bearer instead of the cookie.

        Raises:
            BrokerRefusedError: 401 / 403 / 404 as in the KBS protocol.
            BrokerError: the response does not decrypt.
        """
        p = f"/kbs/v0/resource/{path.strip('/')}"
        if use_token:
            if not self.token:
                raise BrokerError("no EAR token yet: call attest() first")
            if self._bare is None:  # a second client: no session cookie, the token alone
                self._bare = httpx.Client(base_url=self.url, verify=self._verify, timeout=self._timeout)
            try:
                r = self._check(self._bare.get(p, headers={"Authorization": f"Bearer {self.token}"}))
            except httpx.HTTPError as e:
                raise BrokerError(f"broker {self.url} unreachable: {type(e).__name__}: {e}") from None
        else:
            r = self._request("GET", p)
        return protocol.decrypt_response(r.json(), self._jwk)

    def get_keyset(self, name: str, *, repository: str = "default") -> Keyset:
        """Fetch a ``keyset`` secret as a :class:`~safehold.crypto.keyset.Keyset`.

        Raises:
            BrokerRefusedError: as :meth:`get_resource`. BrokerError: the resource is malformed.
        """
        return protocol.keyset_from_json(self.get_resource(f"{repository}/keyset/{name}"))

    def get_value(self, name: str, *, repository: str = "default") -> bytes:
        """Fetch an operator-supplied ``value`` secret."""
        return self.get_resource(f"{repository}/value/{name}")

    def get_certificate(self, name: str, *, extensions: Sequence[tuple[str, bytes]] = ()) -> tuple[str, str]:
        """Obtain the certificate secret ``name`` for this client's TEE key.

        Args:
            name: the manifest's certificate secret.
            extensions: ``(OID, DER extnValue)`` to copy into the leaf, e.g. the RA-TLS Evidence
                extension 2.23.133.5.4.9 (see ``safehold.broker.ca.ALLOWED_EXTENSION_OIDS``).

        Returns:
            ``(leaf certificate PEM, CA certificate PEM)``.
        """
        body = protocol.certificate_request(extensions)
        r = self._request("POST", f"/kbs/v0/certificate/{name}", json=body)
        obj = r.json()
        return obj["certificate"], obj["ca"]

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The TEE private key (certificates are issued to it)."""
        return self._key

    def private_key_pem(self) -> bytes:
        """The TEE private key as unencrypted PKCS#8 PEM (keep it inside the TEE)."""
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def ca_pem(self) -> str:
        """The broker's workload CA (``GET /ca``)."""
        return self._request("GET", "/ca").text
