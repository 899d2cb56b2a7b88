"""The client SDK and the CLI's discovery module load no server code."""

from __future__ import annotations

import json
import subprocess
import sys

SERVER_MODULES = ("fastapi", "uvicorn", "starlette", "safehold.discovery.core", "safehold.discovery.http",
                  "safehold.discovery.server", "safehold.discovery.registry", "safehold.discovery.table",
                  "safehold.discovery.ratelimit", "safehold.discovery.keys")


def loaded_after(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_client_sdk_loads_no_server_module():
    mods = loaded_after("safehold.client.discovery")
    assert "safehold.crypto.oprf" in mods  # the check sees what was loaded
    assert not mods & set(SERVER_MODULES), sorted(mods & set(SERVER_MODULES))
