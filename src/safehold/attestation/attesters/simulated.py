"""The SIMULATED TEE Attester (development and CI). It protects nothing; it exists so the same
attestation code path (Evidence → Verifier → policy → RA-TLS / key release) runs without
hardware, and so that changing one byte of the workload changes what is attested.

Per data directory, created once (files 0600, directory 0700, under ``<data_dir>/simulated-tee``):

* ``root-ca.key`` / ``root-ca.pem`` — the simulated root CA (ECDSA P-384, self-signed);
* ``platform.key`` / ``platform.pem`` — the simulated platform key (ECDSA P-384), certified by
  the root. It signs every report.

A Verifier trusts the simulated root only when told to (policy ``simulated_root = "<path to
root-ca.pem>"`` and ``allow_simulated = true``).

The measurement is the **closure of the running process** plus its configuration files
(``safehold.attestation.workload.current_closure``): interpreter, ``libpython``, standard
library, every installed distribution on ``sys.path``, the application directory and the launch
(flags, module, environment allow-list). The code files are hashed once per process, at the
first attestation (as a TEE measures at load time). A process not started through
``safehold.attestation.workload.LaunchSpec`` measures as an *unrecognised launch*, a value no
Reference Value the data owner computes (``safehold measure``) can equal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from safehold.attestation.attesters.base import Attester
from safehold.attestation.closure import Closure
from safehold.attestation.evidence import Evidence
from safehold.attestation.verifiers.simulated import (
    MEDIA_TYPE,
    PLATFORM_CERT,
    SIGNING_PREFIX,
    encode_report,
)
from safehold.errors import AttestationError
from safehold.fsutil import write_atomic

SUBDIR = "simulated-tee"
_VALIDITY = timedelta(days=3650)


class SimulatedAttester(Attester):
    """A simulated TEE: signs reports of {measurement, report_data, debug} with a local key.

    Args:
        data_dir: directory holding the simulated platform/root keys (created if missing).
        workload_files: the workload's configuration files, measured with the process's code.
        debug: report the TEE as running in debug mode.

    Raises:
        AttestationError: the key directory cannot be created or read, or holds corrupt keys.
        ConfigError: a workload file is missing (from :attr:`measurement`, at the first
            attestation or access).
    """

    tee_type: ClassVar[str] = "simulated"

    def __init__(self, data_dir: str | os.PathLike[str], *,
                 workload_files: Iterable[str | os.PathLike[str]] = (), debug: bool = False) -> None:
        self.dir = Path(data_dir) / SUBDIR
        self.debug = bool(debug)
        self._key, self._platform_der, self._root_pem = _load_or_create(self.dir)
        self._files = list(workload_files)
        self._measurement: Closure | None = None

    @property
    def measurement(self) -> Closure:
        """The measured closure of this process and its workload files (SHA-384 digest:
        ``.digest`` 48 bytes, ``.hex()``), computed at the first access.

        Raises:
            ConfigError: a workload file is missing, or a file cannot be read.
        """
        if self._measurement is None:
            from safehold.attestation.workload import current_closure

            self._measurement = current_closure(self._files)
        return self._measurement

    @property
    def root_ca_path(self) -> Path:
        """Path of the simulated root CA certificate (PEM) that policies name as ``simulated_root``."""
        return self.dir / "root-ca.pem"

    def root_ca_pem(self) -> bytes:
        """The simulated root CA certificate, PEM."""
        return self._root_pem

    def attest(self, report_data: bytes) -> Evidence:
        """Return simulated Evidence binding ``report_data`` (64 bytes).

        Raises:
            ValueError: ``report_data`` is not 64 bytes.
        """
        rd = self.check_report_data(report_data)
        report = encode_report(measurement=self.measurement.digest, report_data=rd,
                               debug=self.debug, timestamp=int(time.time()))
        sig = self._key.sign(SIGNING_PREFIX + report, ec.ECDSA(hashes.SHA384()))
        return Evidence(MEDIA_TYPE, cbor2.dumps([report, sig]), {PLATFORM_CERT: self._platform_der})


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Safehold SIMULATED TEE"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_private(path: Path, data: bytes) -> None:
    write_atomic(path, data, mode=0o600)


def _create(d: Path) -> None:
    now = datetime.now(UTC) - timedelta(minutes=5)
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = (
        x509.CertificateBuilder()
        .subject_name(_name("Safehold SIMULATED root CA (not a real TEE)"))
        .issuer_name(_name("Safehold SIMULATED root CA (not a real TEE)"))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(root_key, hashes.SHA384())
    )
    plat_key = ec.generate_private_key(ec.SECP384R1())
    plat = (
        x509.CertificateBuilder()
        .subject_name(_name("Safehold SIMULATED platform key"))
        .issuer_name(root.subject)
        .public_key(plat_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(root_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    pk8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    _write_private(d / "root-ca.key", root_key.private_bytes(pem, pk8, none))
    _write_private(d / "platform.key", plat_key.private_bytes(pem, pk8, none))
    _write_private(d / "platform.pem", plat.public_bytes(pem))
    # Written last: its presence marks a complete set.
    _write_private(d / "root-ca.pem", root.public_bytes(pem))


def _load_or_create(d: Path) -> tuple[ec.EllipticCurvePrivateKey, bytes, bytes]:
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)  # the directory may pre-exist with a looser mode; it holds key files
        lock_fd = os.open(d / ".lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(lock_fd, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two services starting together create one set
            try:
                if not (d / "root-ca.pem").exists():
                    _create(d)
                key_pem = (d / "platform.key").read_bytes()
                plat_pem = (d / "platform.pem").read_bytes()
                root_pem = (d / "root-ca.pem").read_bytes()
            finally:
                with contextlib.suppress(OSError):
                    fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError as e:
        raise AttestationError(f"simulated TEE key directory {d}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        plat = x509.load_pem_x509_certificate(plat_pem)
    except ValueError:
        raise AttestationError(f"simulated TEE key directory {d} holds corrupt key files") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise AttestationError(f"simulated platform key in {d} is not ECDSA P-384")
    return key, plat.public_bytes(serialization.Encoding.DER), root_pem
