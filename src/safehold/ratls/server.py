"""Server side of RA-TLS: TLS contexts and key/cert files for an :class:`RATLSIdentity`.

The key is generated inside the TEE (``create_identity``) and stays there; files written here
are 0600 in a 0700 directory that should live on the TEE's own (encrypted / in-memory) file
system, e.g. Gramine's ``/tmp`` tmpfs.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from safehold.ratls.cert import RATLSIdentity


def write_identity(identity: RATLSIdentity, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``cert.pem`` (0644) and ``key.pem`` (0600) into ``directory`` (created 0700).

    Returns:
        ``(cert_path, key_path)`` — e.g. for uvicorn's ``ssl_certfile`` / ``ssl_keyfile``.
    """
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, cert_path = d / "key.pem", d / "cert.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(identity.key_pem())
    cert_path.write_bytes(identity.cert_pem())
    return cert_path, key_path


def server_ssl_context(identity: RATLSIdentity) -> ssl.SSLContext:
    """A TLS server context presenting the RA-TLS certificate (TLS >= 1.2, ALPN http/1.1).

    The key is loaded through a private temporary directory that is removed at once (the ssl
    module reads keys only from files).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="safehold-ratls-") as tmp:
        cert_path, key_path = write_identity(identity, tmp)
        ctx.load_cert_chain(cert_path, key_path)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
