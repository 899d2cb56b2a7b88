"""The local development stack: the key broker and the records service on this machine.

What ``safehold up``, ``safehold demo`` and ``safehold status`` do, as a library (the
benchmarks and the tests start stacks with it too):

* :mod:`~safehold.devstack.stack` — :class:`Stack`, its errors, the data directory's lock;
* :mod:`~safehold.devstack.datadir` — :func:`prepare`: tokens, owner key, the measured
  ``records.toml``, manifest and client policy;
* :mod:`~safehold.devstack.processes` — :func:`start` / :func:`stop` the processes;
* :mod:`~safehold.devstack.status` — :func:`stack_status` (``safehold status``);
* :mod:`~safehold.devstack.demo` — :func:`run_demo` (``safehold demo``).

Layout of the data directory (default ``./safehold-data``, created 0700)::

    manifest.toml      the data owner's manifest: Reference Values = the measured records workload
    records.toml       the records service's measured configuration (resources, broker pin)
    policy.toml        the appraisal policy clients use for the records service's Evidence
                       (used by the CLIs only as pinned in the owner directory's pins.json)
    ca.pem             the broker's workload CA (also GET /ca, /v1/values/session=safehold)
    up.json            URLs and paths for `safehold patients` (0600; no token)
    broker/            broker state (sealed master key, SQLite), its simulated TEE
    tee/               the records node's simulated TEE (platform key, simulated root CA)
    records.db         the encrypted records (SQLite; or --store postgresql://…)

The owner directory (default ``<data dir>.owner``, never given to a server) holds
``tokens.json`` (bearer tokens), ``owner.key`` / ``owner.pub`` (the manifest owner's Ed25519
key) and ``pins.json`` (what the owner's tools accept from the data directory: the workload
CA's and the client policies' SHA-256).

The broker and the records service run as separate processes on loopback. The records service
attests to the broker at start; only a workload whose measurement equals the manifest's
Reference Value gets its keyset and TLS identity. Ctrl-C / SIGTERM stops both cleanly; a
process that crashes is restarted with a bounded back-off (:class:`~safehold.devstack.processes.
Supervisor`: the records service keeps serving while the broker restarts).

Both run as measured workloads (``safehold.attestation.workload.LaunchSpec``): an isolated
interpreter (``-I -S -B``, no byte-code cache read), an explicit ``sys.path`` (the package's app
directory, the standard library, the venv's site-packages) and an environment allow-list
(``LC_ALL``/``TZ`` fixed, ``SAFEHOLD_RECORDS_*`` / ``SAFEHOLD_BROKER_*`` run-time settings passed
through; never ``PYTHONPATH``, ``LD_PRELOAD`` or a secret). The manifest's Reference Value is
``LaunchSpec.closure`` over the same interpreter, app directory and ``records.toml``: the same
value ``safehold measure --config records.toml`` prints.

Every security setting is in the measured ``records.toml`` — encryption, audit, listen host,
SCONE authentication and the pin of the broker's identity (SHA-256 of the broker's workload CA
certificate, so the broker's CA is created before anything is measured) — except who holds
which role: that is the owner's manifest (secret ``records-access``, identities pinned).
Only plumbing (ports, URLs, paths, the store location) is passed as ``SAFEHOLD_RECORDS_*``
environment variables, so changing a port does not change the measurement (the database is
untrusted by design, its location is not a secret); the service refuses a variable that names a
measured setting.
"""

from __future__ import annotations

from safehold.devstack.datadir import (
    broker_ca_pin,
    main_records_config,
    make_data_dir,
    measure_records,
    owner_key,
    prepare,
    records_config,
    tokens,
)
from safehold.devstack.errors import DataDirBusyError, StackError
from safehold.devstack.processes import (
    MANIFEST_REFUSED,
    Supervisor,
    broker_cmd,
    check_port,
    records_cmd,
    records_env,
    start,
    stop,
    summary_lines,
    update_manifest,
    wait_broker,
    wait_records,
)
from safehold.devstack.stack import (
    LOCK_FILE,
    SCONE_AUTH_CHOICES,
    Stack,
    base_env,
    lock_data_dir,
    unlock_data_dir,
)

__all__ = [
    "LOCK_FILE",
    "MANIFEST_REFUSED",
    "SCONE_AUTH_CHOICES",
    "DataDirBusyError",
    "Stack",
    "StackError",
    "Supervisor",
    "base_env",
    "broker_ca_pin",
    "broker_cmd",
    "check_port",
    "lock_data_dir",
    "main_records_config",
    "make_data_dir",
    "measure_records",
    "owner_key",
    "prepare",
    "records_cmd",
    "records_config",
    "records_env",
    "start",
    "stop",
    "summary_lines",
    "tokens",
    "unlock_data_dir",
    "update_manifest",
    "wait_broker",
    "wait_records",
]
