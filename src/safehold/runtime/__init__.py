"""The generic workload runtime: attest to the key broker, receive secrets and a workload
certificate in memory, then serve.

Every Safehold workload (records, SVR, discovery, VAU / E-Rezept, a freshness-anchor client)
starts the same way, the way a Trustee/CoCo workload or a MarbleRun "Marble" does:

1. its TEE measures it (:func:`simulated_attester`: the simulated TEE reports the measured
   closure of the running process, ``safehold.attestation.workload.current_closure``);
2. it runs the KBS protocol with the broker whose workload CA is pinned in its measured
   configuration (:func:`pinned_ca`), and receives, *to memory only*, the secrets the data
   owner's manifest lists for it and a certificate for a TLS key generated here (with this
   workload's RA-TLS Evidence in the leaf) — :func:`attest_and_fetch`;
3. it serves (``safehold.runtime.server.serve``, uvicorn) with a TLS context built from memory
   (:meth:`Provisioned.server_context`).

``safehold.runtime.server`` and ``safehold.runtime.http`` (the bearer-token JSON services'
shared HTTP scaffold: access list, ``Authorization`` check, error answers, body limit) are the
only modules here that import a web framework.

Nothing here writes a key, keyset, token or secret to a file, a temporary directory, a log,
argv or the environment. Usage (a service's ``server.py``)::

    from safehold.runtime import attest_and_fetch, pinned_ca, simulated_attester
    from safehold.runtime.server import Listener, serve

    ca_pem = pinned_ca(cfg.broker_ca, cfg.broker_ca_sha256)      # BrokerIdentityError if not pinned
    prov = attest_and_fetch(
        cfg.broker_url, ca_pem, workload="svr-0",
        attester=simulated_attester(cfg.data_dir, [config_path]),
        keysets={"main": "default/keyset/svr-keyset"},             # -> prov.keysets["main"] (Keyset)
        secrets={"access": "default/access/svr-access",            # -> prov.secrets["access"] (bytes)
                 "group": "default/value/svr-group-secret"},
        certificate="default/certificate/svr-tls")                 # TLS identity, RA-TLS Evidence
    ctx = prov.server_context(client_ca=True)                      # SSLContext from memory
    asyncio.run(serve([Listener(app, "127.0.0.1", port, ctx)], on_ready=lambda ports: ...))
    # as a TLS *client* with the workload certificate (e.g. to the freshness anchor):
    prov.cert_pem, prov.key_pem()  ->  freshness.anchor.client.memory_client_context(...)

A process that serves its own socket (discovery, SVR, the VAU) uses the smaller pieces:
:func:`~safehold.runtime.core.simulated_ratls_context` (RA-TLS from the simulated TEE, key in
memory), :func:`~safehold.runtime.core.listen_socket`,
:func:`~safehold.runtime.core.write_ready_file` and
:func:`~safehold.runtime.core.exit_status` (one stderr line; exit 2 on ``NoKeysError``).

Errors: :class:`~safehold.runtime.errors.NoKeysError` (the broker refused: the message carries
its reason, expected vs. got), :class:`~safehold.runtime.errors.BrokerIdentityError` (not the
pinned broker), ``BrokerError`` (unreachable / malformed answer), ``ConfigError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from safehold.runtime.errors import BrokerIdentityError, NoKeysError

if TYPE_CHECKING:
    from safehold.runtime.core import (
        Provisioned,
        attest_and_fetch,
        ca_sha256,
        exit_status,
        listen_socket,
        memory_server_context,
        pinned_ca,
        simulated_attester,
        simulated_ratls_context,
        write_ready_file,
    )

_CORE = frozenset({"Provisioned", "attest_and_fetch", "ca_sha256", "exit_status", "listen_socket",
                   "memory_server_context", "pinned_ca", "simulated_attester", "simulated_ratls_context",
                   "write_ready_file"})


def __getattr__(name: str) -> Any:
    # lazy: ``safehold.records.errors`` (shared with the client SDK) imports runtime.errors, and
    # must not pull in the attester and the broker client with it
    if name in _CORE:
        from safehold.runtime import core

        return getattr(core, name)
    raise AttributeError(f"module 'safehold.runtime' has no attribute {name!r}")

__all__ = [
    "BrokerIdentityError",
    "NoKeysError",
    "Provisioned",
    "attest_and_fetch",
    "ca_sha256",
    "exit_status",
    "listen_socket",
    "memory_server_context",
    "pinned_ca",
    "simulated_attester",
    "simulated_ratls_context",
    "write_ready_file",
]
