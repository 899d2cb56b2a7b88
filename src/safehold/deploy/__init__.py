"""Deployment artefacts for Kubernetes with confidential nodes (docs/deploy-aks.md).

One source of truth for how each Safehold workload is started in a container:

* :mod:`safehold.deploy.workloads` — the catalogue: per workload the module the measured launch
  runs, its run-time arguments, the environment allow-list, ports, probes, measured config and
  enclave sizing; the container image's interpreter layout; the chart's generated workload file;
* :mod:`safehold.deploy.gramine` — Gramine (>= 1.9) manifests whose ``sgx.trusted_files`` are the
  measured closure of :mod:`safehold.attestation.closure` (the list ``safehold measure`` hashes)
  and whose ``loader.env`` is the launch's allow-list.

This package knows workloads by name and module path only: it imports no service package, so
the cores of the services never depend on how they are deployed (import contract in
pyproject.toml).
"""

from __future__ import annotations

__all__: list[str] = []
