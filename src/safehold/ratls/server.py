"""Server side of RA-TLS: the TLS context for an :class:`RATLSIdentity`.

The key is generated inside the TEE (``create_identity``) and stays in its memory: the context
is loaded through :mod:`safehold.ratls.memkey` (an anonymous ``memfd``), never through a file.
"""

from __future__ import annotations

import ssl

from safehold.ratls.cert import RATLSIdentity
from safehold.ratls.memkey import ssl_context_from_memory

__all__ = ["server_ssl_context"]


def server_ssl_context(identity: RATLSIdentity) -> ssl.SSLContext:
    """A TLS server context presenting the RA-TLS certificate (TLS >= 1.2, ALPN http/1.1).

    Raises:
        ConfigError: no ``memfd_create`` on this platform (see :mod:`safehold.ratls.memkey`).
    """
    ctx = ssl_context_from_memory(identity.cert_pem(), identity.key_pem())
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
