"""The records service's configuration: the measured TOML file plus run-time plumbing.

Only the configuration file is measured (it is part of the workload's measurement, so the data
owner's manifest approves it), so the ``SAFEHOLD_RECORDS_*`` environment variables may set only
the run-time plumbing in :data:`RUNTIME_SETTINGS` (ports, paths, URLs); a variable naming any
security setting (:data:`MEASURED_SETTINGS`) makes the service refuse to start.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from safehold.errors import ConfigError
from safehold.netaddr import is_loopback

__all__ = ["ENV_PREFIX", "MEASURED_SETTINGS", "RUNTIME_SETTINGS", "ServiceConfig", "is_loopback"]

#: Settings the environment may set (``SAFEHOLD_RECORDS_<NAME>``): plumbing whose value cannot
#: weaken confidentiality or access control (the database is untrusted by design; the broker
#: URL only says where to look, its identity is pinned by the measured ``broker_ca_sha256``).
RUNTIME_SETTINGS = frozenset({"data_dir", "broker_url", "broker_ca", "store_url", "port",
                              "scone_port", "ready_file"})
#: Settings only the measured configuration file may set.
MEASURED_SETTINGS = frozenset({"workload", "keyset_resource", "tls_resource", "access_resource",
                               "host", "scone_auth", "encryption", "audit", "broker_ca_sha256",
                               "freshness", "anchor_members", "anchor_policy", "freshness_wait",
                               "freshness_audit_seconds", "integrity_check", "workers", "compress"})
ENV_PREFIX = "SAFEHOLD_RECORDS_"
#: Upper bound of ``workers`` (processes of one records workload).
MAX_WORKERS = 64


@dataclass
class ServiceConfig:
    """Records service configuration (TOML keys = attribute names).

    Settings in :data:`MEASURED_SETTINGS` come only from the measured file; those in
    :data:`RUNTIME_SETTINGS` may also come from ``SAFEHOLD_RECORDS_<NAME>`` variables.

    Attributes:
        data_dir: directory for the simulated TEE keys and the default SQLite file.
        broker_url: the broker's base URL (``https://127.0.0.1:8443``).
        broker_ca: PEM file of the broker's workload CA (run-time); it must be the certificate
            pinned by ``broker_ca_sha256`` and the broker's TLS certificate must chain to it.
        broker_ca_sha256: measured pin of the broker's identity: SHA-256 (64 hex digits) of the
            DER encoding of the broker's workload CA certificate. Required.
        store_url: ``sqlite:///path`` or ``postgresql://…``; default ``<data_dir>/records.db``.
        workload: the manifest's workload name for this service.
        keyset_resource / tls_resource: KBS resource paths ``<repository>/<type>/<tag>`` of
            the keyset and of the certificate secret.
        host: listen address (loopback by default; measured).
        port: native API port (0 = pick a free one and report it in ``ready_file``).
        scone_port: SCONE-compatible port (default 4996; None disables it).
        scone_auth: ``token`` (default: the native API's bearer tokens) or ``none`` (as the
            SCONE demo: no authentication; an explicit opt-in, only with a loopback ``host``,
            warned about at start and by ``safehold status``).
        encryption: True; False only for the benchmark's baseline (a pass-through codec),
            and only through the measured file (the service then warns loudly at start).
        ready_file: if set, a JSON file written once both ports listen (URLs, ports, pid).
        audit: keep the access audit (True by default).
        access_resource: KBS resource path of the ``access`` secret: who may call the service,
            with which role (:class:`safehold.records.access.AccessList`). The data owner writes
            it in the manifest, pinning each identity (token SHA-256, client key SHA-256); the
            broker releases it after attestation. The configuration holds no access list (an
            ``access`` table here is refused), so nobody but the owner grants a role.
        freshness: True (default): the store is wrapped in a
            :class:`~safehold.freshness.store.FreshStore` anchored by ``anchor_members``
            (docs/freshness.md); False only through the measured file, announced loudly (the
            database can then roll back, omit and fork data undetected).
        anchor_members: the anchor members' ``https://`` URLs (measured: the members' own
            configuration lists the same URLs, so they are part of their Reference Value too).
        anchor_policy: the members' appraisal policy (``AppraisalPolicy`` table: their own
            Reference Value, e.g. ``reference_values.measurements``); measured, so a host cannot
            point the service at another anchor build.
        freshness_wait: seconds a write (or a read of a row not yet anchored) waits for the
            anchor before 503 ``not-anchored``.
        freshness_audit_seconds: interval of the background full audit (0 = off).
        integrity_check: when a SQLite store's ``PRAGMA quick_check`` (O(file size)) runs:
            ``background`` (default: after the service starts serving; a failure refuses every
            further operation with ``store-corrupt`` and turns ``/healthz`` 503) or ``start``
            (before serving; the service exits 1 on a corrupt file). Never skipped.
        workers: processes serving this workload (1 to :data:`MAX_WORKERS`; measured): one
            attestation, then worker processes forked with the keys, sharing the listening
            sockets, the store and the freshness ledger (:mod:`safehold.records.workers`).
        compress: True (default): records are written zlib-compressed when shorter and padded
            to a multiple of 256 bytes inside the AES-GCM plaintext (frame version 2,
            :mod:`safehold.records.frame`), so the database sees the compressed length rounded
            up to 256 bytes; False: exact-length uncompressed storage (frame version 1), for an
            operator who rules out compression side channels (docs/threat-model.md). Measured (a
            TOML boolean); either setting reads rows of both versions.
    """

    data_dir: str = "./safehold-data"
    broker_url: str = "https://127.0.0.1:8443"
    broker_ca: str = ""
    broker_ca_sha256: str = ""
    store_url: str = ""
    workload: str = "records"
    keyset_resource: str = "default/keyset/records-keyset"
    tls_resource: str = "default/certificate/records-tls"
    host: str = "127.0.0.1"
    port: int = 8700
    scone_port: int | None = 4996
    scone_auth: str = "token"
    encryption: bool = True
    ready_file: str = ""
    audit: bool = True
    access_resource: str = "default/access/records-access"
    freshness: bool = True
    anchor_members: list[str] = field(default_factory=list)
    anchor_policy: dict[str, Any] = field(default_factory=dict)
    freshness_wait: float = 5.0
    freshness_audit_seconds: float = 300.0
    integrity_check: str = "background"
    workers: int = 1
    compress: bool = True

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None, env: dict[str, str] | None = None) -> ServiceConfig:
        """Read the measured TOML file (``path`` may be None) and apply the run-time
        ``SAFEHOLD_RECORDS_<NAME>`` variables of ``env`` (default ``os.environ``).

        Raises:
            ConfigError: unreadable TOML, unknown keys, values of the wrong type; an environment
                variable for a measured setting (or an unknown one); no broker pin; or
                ``scone_auth = "none"`` with a SCONE port on a non-loopback ``host``.
        """
        data: dict[str, Any] = {}
        if path:
            try:
                data = tomllib.loads(Path(path).read_text("utf-8"))
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"records service config {path}: {e}") from None
        names = {f.name: f for f in fields(cls)}
        if "access" in data:
            raise ConfigError(
                "records service config: 'access' is no longer read from the configuration: the "
                "data owner pins who holds which role in the broker manifest (a secret of type "
                "'access', named by access_resource; docs/records.md). Remove [access]")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"records service config: unknown keys {unknown}")
        env = dict(os.environ) if env is None else env
        for var in sorted(k for k in env if k.startswith(ENV_PREFIX)):
            name = var[len(ENV_PREFIX):].lower()
            if name in MEASURED_SETTINGS:
                # refuse rather than ignore: the unmeasured host must not change security settings
                raise ConfigError(f"{var} is set, but {name!r} is a measured setting: only the "
                                  "measured config file may set it (unset the variable)")
            if name not in RUNTIME_SETTINGS:
                raise ConfigError(f"{var}: unknown setting; the environment may set only "
                                  f"{sorted(n.upper() for n in RUNTIME_SETTINGS)}")
            data[name] = env[var]
        cfg = cls(**data)
        for name in ("port", "scone_port"):
            v = getattr(cfg, name)
            if isinstance(v, str):
                try:
                    setattr(cfg, name, None if v.lower() in ("", "none", "off") else int(v))
                except ValueError:
                    raise ConfigError(f"{name} must be a port number or 'none', got {v!r}") from None
        for name in ("encryption", "audit", "freshness", "compress"):
            if not isinstance(getattr(cfg, name), bool):  # only TOML booleans, never "0"/"off"
                raise ConfigError(f"{name} must be a TOML boolean, got {getattr(cfg, name)!r}")
        w = cfg.workers
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_WORKERS:
            raise ConfigError(f"workers must be an integer from 1 to {MAX_WORKERS}, got {w!r}")
        if cfg.integrity_check not in ("background", "start"):
            raise ConfigError(f"integrity_check must be 'background' or 'start', got {cfg.integrity_check!r}")
        if cfg.scone_auth not in ("none", "token"):
            raise ConfigError(f"scone_auth must be 'none' or 'token', got {cfg.scone_auth!r}")
        if cfg.scone_auth == "none" and cfg.scone_port is not None and not is_loopback(cfg.host):
            raise ConfigError(
                f"scone_auth = 'none' serves records without authentication; it is allowed only "
                f"on a loopback host, got host {cfg.host!r} (set scone_auth = 'token')"
            )
        pin = cfg.broker_ca_sha256.lower()
        if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
            raise ConfigError("broker_ca_sha256 must pin the broker's workload CA in the measured "
                              f"config (64 hex digits of SHA-256 over its DER), got {pin[:70]!r}")
        cfg.broker_ca_sha256 = pin
        _check_freshness(cfg)
        if not cfg.store_url:
            cfg.store_url = f"sqlite:///{Path(cfg.data_dir).resolve() / 'records.db'}"
        return cfg

    def anchor_appraisal(self) -> Any:
        """The anchor members' :class:`~safehold.attestation.policy.AppraisalPolicy`.

        Raises:
            ConfigError: the ``anchor_policy`` table is invalid.
        """
        from safehold.attestation.policy import AppraisalPolicy
        from safehold.errors import SafeholdError

        d = {"name": "anchor", **self.anchor_policy}
        try:
            return AppraisalPolicy.from_dict(d)
        except SafeholdError as e:
            raise ConfigError(f"records service config: anchor_policy: {e}") from None


def _check_freshness(cfg: ServiceConfig) -> None:
    """The freshness settings' shapes (module docstring of :class:`ServiceConfig`).

    Raises:
        ConfigError: naming the setting.
    """
    if not cfg.freshness:
        return
    m = cfg.anchor_members
    if not (isinstance(m, list) and m and all(isinstance(u, str) and u.startswith("https://") for u in m)):
        raise ConfigError("freshness = true (the default) needs anchor_members: the anchor members' "
                          "https:// URLs in the measured config (docs/freshness.md); "
                          "freshness = false turns rollback detection off, loudly")
    if not isinstance(cfg.anchor_policy, dict) or not cfg.anchor_policy:
        raise ConfigError("freshness = true needs anchor_policy: the anchor members' appraisal policy "
                          "(their Reference Value) in the measured config")
    for name in ("freshness_wait", "freshness_audit_seconds"):
        v = getattr(cfg, name)
        bad = isinstance(v, bool) or not isinstance(v, int | float) or v < 0
        if bad or (name == "freshness_wait" and v == 0):
            raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
    cfg.anchor_appraisal()
