"""TLS keys loaded from memory: the one way Safehold hands a private key to OpenSSL.

Python's :mod:`ssl` loads a certificate chain and its key only from a file name
(``SSLContext.load_cert_chain``). Writing the key to a file — even a 0600 file in a private
temporary directory removed at once — puts it on the host's storage, outside the TEE, where an
inotify/fanotify watch reads it during start-up (issue 11, finding 1). Here the PEM bytes go
into an anonymous in-memory file (Linux ``memfd_create(2)``, ``MFD_CLOEXEC``: no path in any file
system, never inherited by a child) that OpenSSL opens as ``/proc/self/fd/N``; the descriptor is
closed as soon as the context holds the key. There is no fallback to a temporary file: on a
platform without ``memfd_create`` loading fails closed with :class:`~safehold.errors.ConfigError`.

Every TLS key a Safehold process holds is loaded through :func:`load_chain_from_memory`: the
records service, the broker, RA-TLS servers (SVR, freshness anchor members, the RA-TLS demo)
and the anchor's mutual-TLS client.
"""

from __future__ import annotations

import os
import ssl

from safehold.errors import ConfigError

__all__ = ["load_chain_from_memory", "ssl_context_from_memory"]


def load_chain_from_memory(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Load a PEM certificate chain (leaf first) and its PEM private key into ``ctx`` from memory.

    Args:
        ctx: the context to load into (server or client side).
        cert_pem: the leaf certificate followed by any intermediates (RFC 7468 PEM).
        key_pem: the leaf's private key (PKCS#8 or traditional PEM, unencrypted).

    Raises:
        ConfigError: no ``memfd_create`` on this platform (keys are never written to a file), or
            the chain and key do not load or do not match (the message names neither's bytes).
    """
    if not hasattr(os, "memfd_create"):
        raise ConfigError("loading a TLS key from memory needs memfd_create (Linux >= 3.17); "
                          "Safehold never writes a private key to a file")
    fd = os.memfd_create("safehold-tls", os.MFD_CLOEXEC)
    try:
        view, off = memoryview(cert_pem.rstrip(b"\n") + b"\n" + key_pem), 0
        while off < len(view):
            off += os.write(fd, view[off:])
        try:
            # one memfd: OpenSSL reads the chain's certificates and then the key from the same file
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        except (ssl.SSLError, OSError) as e:
            why = getattr(e, "reason", None) or type(e).__name__
            raise ConfigError(f"TLS identity does not load from memory: {why}") from None
    finally:
        os.close(fd)


def ssl_context_from_memory(cert_pem: bytes, key_pem: bytes, *,
                            client_ca_pem: bytes | None = None,
                            minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> ssl.SSLContext:
    """A TLS server context presenting ``cert_pem`` / ``key_pem``, loaded from memory.

    Args:
        cert_pem / key_pem: as :func:`load_chain_from_memory`.
        client_ca_pem: with it, client certificates are requested and verified against these
            CA certificates (``CERT_OPTIONAL``: callers without one authenticate otherwise).
        minimum_version: lowest TLS version offered (default 1.2, RFC 5246; 1.3 is RFC 8446).

    Raises:
        ConfigError: as :func:`load_chain_from_memory`, or ``client_ca_pem`` does not load.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum_version
    load_chain_from_memory(ctx, cert_pem, key_pem)
    if client_ca_pem:
        try:
            ctx.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError(f"client CA certificates do not load: {type(e).__name__}") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
