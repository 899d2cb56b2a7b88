"""The workload SDK loads no server code: importing ``safehold.client`` and its modules in a
fresh interpreter pulls in no part of the broker other than its wire format
(``safehold.broker.protocol``), and no web framework or ASGI server; the discovery SDK loads none
of the discovery service (core, HTTP layer, process, registry, table, rate limiter, keys)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # starts Python subprocesses (fresh interpreters)

CLIENT_MODULES = ("safehold.client", "safehold.client.broker", "safehold.client.records")
#: The broker package itself (an empty ``__init__``) and its wire format are what a client needs.
ALLOWED_BROKER = {"safehold.broker", "safehold.broker.protocol"}
SERVER_FRAMEWORKS = ("fastapi", "uvicorn", "starlette")
#: What the discovery SDK (``safehold.client.discovery``) must not load: the service's core,
#: HTTP layer, process, registry, table, rate limiter and keys.
DISCOVERY_SERVER_MODULES = ("safehold.discovery.core", "safehold.discovery.http",
                            "safehold.discovery.server", "safehold.discovery.registry",
                            "safehold.discovery.table", "safehold.discovery.ratelimit",
                            "safehold.discovery.keys")


def _loaded_after_import(modules: tuple[str, ...]) -> list[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True)
    return json.loads(out.stdout)


def _server_modules(loaded: list[str]) -> list[str]:
    return [m for m in loaded
            if (m.startswith("safehold.broker") and m not in ALLOWED_BROKER)
            or m.split(".")[0] in SERVER_FRAMEWORKS]


def test_client_sdk_imports_no_server_module():
    loaded = _loaded_after_import(CLIENT_MODULES)
    assert "safehold.broker.protocol" in loaded  # the check below looks at a real import graph
    assert _server_modules(loaded) == []


def test_the_check_notices_a_server_module():
    """The same check, fed an import that does load the broker core, reports it (so the test
    above cannot pass by looking at the wrong thing)."""
    loaded = _loaded_after_import(("safehold.client.broker", "safehold.broker.server"))
    bad = _server_modules(loaded)
    assert "safehold.broker.server" in bad


def test_discovery_sdk_loads_no_server_module():
    loaded = _loaded_after_import(("safehold.client.discovery",))
    assert "safehold.crypto.oprf" in loaded  # the check sees what was loaded
    bad = sorted(set(loaded) & set(DISCOVERY_SERVER_MODULES + SERVER_FRAMEWORKS))
    assert bad == []


#: What the SVR SDK (``safehold.client.svr``) must not load: the service's core, rows, protocol
#: engines, keys, HTTP layer, process, nor the store, the records engine or freshness.
SVR_SERVER_MODULES = ("safehold.svr.core", "safehold.svr.rows", "safehold.svr.svr2", "safehold.svr.svr3",
                      "safehold.svr.keys", "safehold.svr.http", "safehold.svr.server", "safehold.store",
                      "safehold.records.engine", "safehold.freshness")


def test_svr_sdk_loads_no_server_module():
    loaded = _loaded_after_import(("safehold.client.svr",))
    assert "safehold.svr.db4" in loaded and "safehold.svr.pin" in loaded  # the shared modules
    bad = sorted(set(loaded) & set(SVR_SERVER_MODULES + SERVER_FRAMEWORKS))
    assert bad == []
