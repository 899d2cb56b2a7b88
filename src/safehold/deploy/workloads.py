"""The workload catalogue: how each Safehold workload runs in a container (one place to edit).

Every consumer reads this module: the Gramine manifest generator (:mod:`safehold.deploy.gramine`:
``loader.argv``, ``loader.env``, ``sgx.max_threads``, ``sgx.enclave_size``), the Helm chart
(through the generated ``deploy/helm/safehold/files/workloads.json``, see
:func:`chart_document`; a test keeps the committed file equal to it), and the process rehearsal
of the chart (a later phase).

A pod starts its workload with the **launch spec** of :mod:`safehold.attestation.workload`::

    /opt/safehold/bin/python -I -S -B -X utf8 -X pycache_prefix=... -c BOOT <module>
        <env policy> <sys.path ...> -- <args>

so the module, the interpreter flags, ``sys.path`` and the environment allow-list are part of the
measured launch description, exactly as on a developer's machine. The environment allow-list of
a pod is the workload's own variables plus :data:`POD_PLATFORM_ENV`, the names the kubelet and
the container runtime set in *every* container whatever the pod spec says (``PATH``,
``HOSTNAME``, the ``kubernetes`` Service's ``KUBERNETES_*`` variables); the chart turns off the
other Service links (``enableServiceLinks: false``) so no further name appears. Their values are
host-controlled and no Safehold code reads them; under Gramine they are not even passed in.

Paths inside the container (:data:`IMAGE_VENV`, :data:`CONFIG_DIR`, ...) are fixed by
``deploy/Dockerfile`` and the chart; :func:`image_layout` is the interpreter layout the image
build checks against the real one (``safehold deploy check-image``), so a changed base image
fails the build instead of producing a launch that measures differently.

Workloads not yet deployable as pods (``deployable = False``) say why in ``blocker``: the chart
renders them only when explicitly enabled, and the Gramine generator still writes their
manifest (the launch is known).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from safehold.attestation.closure import InterpreterLayout
from safehold.attestation.workload import FIXED_ENV, LaunchSpec
from safehold.errors import ConfigError

__all__ = [
    "BROKER_CA_DIR",
    "CHART_FILE_FORMAT",
    "CONFIG_DIR",
    "IMAGE_PYTHON",
    "IMAGE_VENV",
    "KUBERNETES_VERSIONS",
    "POD_PLATFORM_ENV",
    "STATE_DIR",
    "WORKLOADS",
    "EnvVar",
    "Port",
    "Workload",
    "chart_document",
    "chart_json",
    "get",
    "image_layout",
]

#: The virtual environment the image installs Safehold and its locked dependencies into.
IMAGE_VENV = "/opt/safehold"
#: The interpreter of the image (Debian 12's CPython 3.11; the venv's ``bin/python`` links to it).
IMAGE_PYTHON = "/usr/bin/python3.11"
#: Measured configuration files (a ConfigMap the data owner approves; baked into SGX images).
CONFIG_DIR = "/etc/safehold/config"
#: The broker's workload CA certificate (PEM), which relying workloads pin by SHA-256.
BROKER_CA_DIR = "/etc/safehold/broker-ca"
#: Writable state: simulated-TEE keys (development), the broker's data directory.
STATE_DIR = "/var/lib/safehold"

#: Kubernetes minor versions every rendered object is validated against (AKS: the three GA
#: minors plus the LTS ones in support, and the next minor; see docs/deploy-aks.md).
KUBERNETES_VERSIONS: tuple[str, ...] = ("1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0",
                                        "1.36.0")

#: Variables every Linux container gets from the kubelet / container runtime regardless of the
#: pod spec (the ``kubernetes`` Service in ``default`` is injected even with
#: ``enableServiceLinks: false``). The launch's allow-list must name them or BOOT refuses to
#: start; their values are not measured and no Safehold code reads them.
POD_PLATFORM_ENV: tuple[str, ...] = (
    "HOME", "HOSTNAME", "PATH",
    "KUBERNETES_PORT", "KUBERNETES_PORT_443_TCP", "KUBERNETES_PORT_443_TCP_ADDR",
    "KUBERNETES_PORT_443_TCP_PORT", "KUBERNETES_PORT_443_TCP_PROTO", "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT", "KUBERNETES_SERVICE_PORT_HTTPS",
)

#: Version of the chart's generated workload file (``files/workloads.json``).
CHART_FILE_FORMAT = "safehold-deploy-workloads-v1"

#: Where a pod variable's value comes from (the chart maps each source to a pod env entry).
EnvSource = Literal["literal", "postgres-dsn", "broker-url", "broker-tls-names"]


@dataclass(frozen=True)
class Port:
    """A listening port: ``name`` (IANA service name, at most 15 characters) and TCP number."""

    name: str
    number: int
    purpose: str


@dataclass(frozen=True)
class EnvVar:
    """One variable of the workload's allow-list and where the pod takes its value.

    Attributes:
        name: the variable (passed through: its value is host-controlled, never measured).
        source: ``literal`` (``value`` as is), ``postgres-dsn`` (the DSN Secret the operator
            names), ``broker-url`` (the broker Service URL), ``broker-tls-names`` (the broker
            Service's DNS names, space-separated).
        value: the literal value (``literal`` only).
    """

    name: str
    source: EnvSource = "literal"
    value: str = ""


@dataclass(frozen=True)
class Workload:
    """How one workload runs in a pod (module docstring).

    Attributes:
        name: the workload's name (chart component, manifest file name).
        module: the module the launch runs as ``__main__`` (measured).
        args: run-time arguments after ``--`` (fixed in-container paths and ports; under Gramine
            they are part of ``loader.argv`` and so of MRENCLAVE).
        env: the workload's own variables (allow-listed, values from the pod).
        config: the measured configuration file's name under :data:`CONFIG_DIR`, or None.
        ports: listening ports; ``probe_port`` names the one TCP probes connect to.
        kind: the controller the chart renders.
        writable: directories the process writes (memory-backed or persistent volumes).
        persistent: the writable directory that needs a PersistentVolumeClaim (StatefulSet).
        needs_broker_ca: mounts the broker CA ConfigMap at :data:`BROKER_CA_DIR`.
        max_threads: ``sgx.max_threads`` (Python threads at peak + Gramine's helpers, >= 4).
        enclave_size: ``sgx.enclave_size`` (committed EPC without EDMM).
        epc: the pod's ``sgx.intel.com/epc`` request (a Kubernetes quantity).
        deployable: False when the process cannot yet run as a pod on its own.
        blocker: why not (shown by the chart and the CLI).
        tee_dir: the Attester's data directory (the simulated TEE keeps its keys in
            ``<tee_dir>/simulated-tee``), or None when the workload does not attest yet.
    """

    name: str
    module: str
    args: tuple[str, ...]
    env: tuple[EnvVar, ...]
    config: str | None
    ports: tuple[Port, ...]
    probe_port: str
    kind: Literal["StatefulSet", "Deployment"]
    writable: tuple[str, ...] = ("/tmp",)  # noqa: S108 - a memory-backed volume of the pod
    persistent: str | None = None
    needs_broker_ca: bool = False
    max_threads: int = 64
    enclave_size: str = "2G"
    epc: str = "2Gi"
    deployable: bool = True
    blocker: str = ""
    tee_dir: str | None = None

    @property
    def passthrough(self) -> tuple[str, ...]:
        """The launch's passthrough allow-list in a pod: own variables + :data:`POD_PLATFORM_ENV`."""
        return tuple(sorted({v.name for v in self.env} | set(POD_PLATFORM_ENV)))

    @property
    def gramine_passthrough(self) -> tuple[str, ...]:
        """The allow-list under Gramine Shielded Containers: :attr:`passthrough` plus
        ``LD_LIBRARY_PATH``, which GSC's manifest sets to a fixed (signed) value so the enclave's
        loader finds the image's libraries."""
        return tuple(sorted({*self.passthrough, "LD_LIBRARY_PATH"}))

    def config_path(self) -> str | None:
        """The measured config file's in-container path, or None."""
        return f"{CONFIG_DIR}/{self.config}" if self.config else None

    def launch_spec(self, executable: str | None = None, *, gramine: bool = False) -> LaunchSpec:
        """The :class:`~safehold.attestation.workload.LaunchSpec` of this workload in the image
        (safehold installed in the venv's site-packages, so no ``app_dir``); ``gramine`` uses
        :attr:`gramine_passthrough`."""
        return LaunchSpec(self.module, app_dir=None,
                          passthrough=self.gramine_passthrough if gramine else self.passthrough,
                          fixed_env=dict(FIXED_ENV), executable=executable or f"{IMAGE_VENV}/bin/python")

    def argv(self, layout: InterpreterLayout | None = None, *, gramine: bool = False) -> list[str]:
        """The container's full command line (launch + run-time args) for ``layout`` (default
        :func:`image_layout`)."""
        lay = layout or image_layout()
        return self.launch_spec(lay.executable, gramine=gramine).argv(*self.args, layout=lay)


def image_layout(venv: str = IMAGE_VENV, python: str = IMAGE_PYTHON) -> InterpreterLayout:
    """The interpreter layout of the image: Debian 12's CPython 3.11 (``python3.11`` package,
    statically linked: it maps no ``libpython``) with a virtual environment at ``venv``.

    ``site.getsitepackages`` of Debian's patched ``site`` gives four directories for a venv
    prefix; all are on ``sys.path`` (the three ``dist-packages`` ones stay empty).
    """
    v = venv.rstrip("/")
    site = (f"{v}/lib/python3.11/site-packages", f"{v}/local/lib/python3.11/dist-packages",
            f"{v}/lib/python3/dist-packages", f"{v}/lib/python3.11/dist-packages")
    anchors = (("stdlib", "/usr/lib/python3.11"), ("site-packages", site[0]),
               *((f"site-packages.{i + 2}", p) for i, p in enumerate(site[1:])))
    return InterpreterLayout(f"{v}/bin/python", python, None,
                             ("/usr/lib/python311.zip", "/usr/lib/python3.11",
                              "/usr/lib/python3.11/lib-dynload"),
                             site, anchors)


_TMP = ("/tmp",)  # noqa: S108 - a memory-backed emptyDir (pods) or tmpfs in the enclave (Gramine)

WORKLOADS: Mapping[str, Workload] = {w.name: w for w in (
    Workload(
        name="broker",
        # the broker's own entry point: the measured launch names the broker, not the CLI
        module="safehold.broker.server",
        # all interfaces of the pod: the Service and the NetworkPolicy decide who reaches it
        args=("--data-dir", f"{STATE_DIR}/broker", "--host", "0.0.0.0",  # noqa: S104
              "--port", "8443"),
        env=(EnvVar("SAFEHOLD_BROKER_STORE_URL", "postgres-dsn"),
             EnvVar("SAFEHOLD_BROKER_TLS_NAMES", "broker-tls-names")),
        config=None,
        ports=(Port("https", 8443, "KBS, admin API, workload CA"),),
        probe_port="https",
        kind="StatefulSet",
        writable=_TMP,
        persistent=f"{STATE_DIR}/broker",
        tee_dir=f"{STATE_DIR}/broker",
        max_threads=64,
        enclave_size="2G",
        epc="2Gi",
    ),
    Workload(
        name="records",
        module="safehold.records.server",
        args=("--config", f"{CONFIG_DIR}/records.toml"),
        env=(EnvVar("SAFEHOLD_RECORDS_DATA_DIR", value=f"{STATE_DIR}/tee"),
             EnvVar("SAFEHOLD_RECORDS_BROKER_URL", "broker-url"),
             EnvVar("SAFEHOLD_RECORDS_BROKER_CA", value=f"{BROKER_CA_DIR}/ca.pem"),
             EnvVar("SAFEHOLD_RECORDS_STORE_URL", "postgres-dsn"),
             EnvVar("SAFEHOLD_RECORDS_PORT", value="8700"),
             EnvVar("SAFEHOLD_RECORDS_SCONE_PORT", value="4996")),
        config="records.toml",
        ports=(Port("https", 8700, "native API and FHIR R4 REST"),
               Port("scone", 4996, "SCONE-compatible API (token auth off loopback)")),
        probe_port="https",
        kind="Deployment",
        writable=(*_TMP, f"{STATE_DIR}/tee"),
        needs_broker_ca=True,
        tee_dir=f"{STATE_DIR}/tee",
        max_threads=64,
        enclave_size="4G",
        epc="4Gi",
    ),
    Workload(
        name="anchor",
        module="safehold.freshness.anchor.server",
        args=("--config", f"{CONFIG_DIR}/anchor.toml", "--data-dir", f"{STATE_DIR}/tee",
              "--port", "7600", "--client-ca", f"{BROKER_CA_DIR}/ca.pem"),
        env=(),
        config="anchor.toml",
        ports=(Port("https", 7600, "anchor member (RA-TLS, mTLS for writes)"),),
        probe_port="https",
        kind="StatefulSet",
        writable=(*_TMP, f"{STATE_DIR}/tee"),
        needs_broker_ca=True,
        tee_dir=f"{STATE_DIR}/tee",
        max_threads=32,
        enclave_size="1G",
        epc="1Gi",
    ),
    Workload(
        name="vau",
        module="safehold.vau.server",
        args=(),
        env=(),
        config=None,
        ports=(Port("http", 8080, "E-Rezept and ePA 3 VAU (loopback only for now)"),),
        probe_port="http",
        kind="Deployment",
        writable=_TMP,
        max_threads=32,
        enclave_size="2G",
        epc="2Gi",
        deployable=False,
        blocker=("reads its keys as CBOR on standard input from a launcher and listens on loopback "
                 "only; deployable once the broker releases the VAU keys to it after attestation"),
    ),
    Workload(
        name="discovery",
        module="safehold.discovery.server",
        args=("--config", f"{CONFIG_DIR}/discovery.toml"),
        env=(),
        config="discovery.toml",
        ports=(Port("http", 8800, "contact discovery (loopback only for now)"),),
        probe_port="http",
        kind="Deployment",
        writable=_TMP,
        max_threads=32,
        enclave_size="2G",
        epc="2Gi",
        deployable=False,
        blocker=("reads the discovery secret on standard input and serves plain HTTP on loopback "
                 "only; deployable once it is behind RA-TLS and receives its secret from the broker"),
    ),
)}


def get(name: str) -> Workload:
    """The workload called ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ConfigError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}") from None


def chart_document(layout: InterpreterLayout | None = None) -> dict[str, object]:
    """The chart's generated workload file (``files/workloads.json``): per workload the
    container command (the launch, measured part included), the env allow-list with sources,
    ports, probe port, volumes and enclave sizing. The chart takes commands and variables only
    from here; values choose replicas, resources, nodes and images."""
    lay = layout or image_layout()
    out: dict[str, object] = {}
    for w in WORKLOADS.values():
        out[w.name] = {
            "module": w.module,
            "command": w.argv(lay),
            "env": [{"name": v.name, "source": v.source,
                     **({"value": v.value} if v.source == "literal" else {})} for v in w.env],
            "allowList": list(w.passthrough),
            "config": w.config,
            "ports": [{"name": p.name, "number": p.number} for p in w.ports],
            "probePort": w.probe_port,
            "kind": w.kind,
            "writable": [d for d in w.writable if d != w.persistent],
            "persistent": w.persistent,
            "needsBrokerCa": w.needs_broker_ca,
            "teeDir": w.tee_dir,
            "epc": w.epc,
            "deployable": w.deployable,
            "blocker": w.blocker,
        }
    return {"format": CHART_FILE_FORMAT, "generatedBy": "safehold deploy chart-workloads",
            "configDir": CONFIG_DIR, "brokerCaDir": BROKER_CA_DIR, "stateDir": STATE_DIR,
            "workloads": out}


def chart_json(layout: InterpreterLayout | None = None) -> str:
    """:func:`chart_document` as the exact bytes committed in the chart (sorted keys, 2-space
    indent, trailing newline)."""
    return json.dumps(chart_document(layout), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
