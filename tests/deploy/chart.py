"""Render the Helm chart with Helm's own engine (helm-python-sdk: Helm v4 through libhelm_c,
bundled in the wheel; no cluster, no network) for each preset, and the objects as dicts.

The chart tools (helm-python-sdk, kubernetes-validate) live in ``.deploy-tools/`` (or
``SAFEHOLD_DEPLOY_TOOLS``), installed by ``.ci/deploy-check`` from deploy/chart-tools.lock, not
in the project's site-packages (pyproject.toml says why); :func:`chart_tool` imports one, and
skips on a laptop without them or fails under CI."""

from __future__ import annotations

import copy
import importlib
import os
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "safehold"
TOOLS = Path(os.environ.get("SAFEHOLD_DEPLOY_TOOLS") or ROOT / ".deploy-tools")
PRESETS = {p.stem: p for p in sorted((ROOT / "deploy" / "helm" / "presets").glob("*.yaml"))}
NAMESPACE = "safehold"
RELEASE = "safehold"
#: What an operator adds on the command line (docs/deploy-aks.md): the image digests of their
#: build. Placeholders of the right shape; no image is pulled.
OPERATOR = {
    "image": {"repository": "example.azurecr.io/safehold", "digest": "sha256:" + "0" * 64},
    "images": {
        n: f"example.azurecr.io/safehold-{n}-gsc@sha256:{'1' * 64}"
        for n in ("broker", "records", "anchor", "vau", "discovery")
    },
}
#: The variant that also renders the workloads not yet deployable (for validation only).
ALL_ON = {"vau": {"enabled": True}, "discovery": {"enabled": True}}


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


def preset_values(name: str, *, all_on: bool = False) -> dict:
    v = _merge(yaml.safe_load(PRESETS[name].read_text("utf-8")), OPERATOR)
    if name == "aks-sgx":  # the GSC path sets images only
        v["image"].pop("digest")
    return _merge(v, ALL_ON) if all_on else v


def chart_tool(module: str) -> ModuleType:
    """Import ``module`` (``helm_python``, ``kubernetes_validate``) from :data:`TOOLS`, after
    the project's own site-packages; skip when the tools are not installed, fail under CI."""
    if (TOOLS / "lock").is_file() and str(TOOLS) not in sys.path:
        sys.path.append(str(TOOLS))  # last: the venv's copies of shared dependencies win
    try:
        return importlib.import_module(module)
    except ImportError as e:
        msg = f"chart tool {module} not installed in {TOOLS} (run bash .ci/deploy-check --prepare): {e}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def render(values: dict) -> dict[str, str]:
    """template path -> rendered text (NOTES.txt included)."""
    with chart_tool("helm_python").Chart.load(str(CHART)) as chart:
        return chart.render(values=values, name=RELEASE, namespace=NAMESPACE)


@cache
def _rendered(name: str, all_on: bool) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(render(preset_values(name, all_on=all_on)).items()))


def rendered(name: str, *, all_on: bool = False) -> dict[str, str]:
    return dict(_rendered(name, all_on))


def objects(name: str, *, all_on: bool = False) -> list[dict]:
    out = []
    for path, text in rendered(name, all_on=all_on).items():
        if path.endswith("NOTES.txt"):
            continue
        out += [d for d in yaml.safe_load_all(text) if d]
    return out


def pod_specs(objs: list[dict]) -> list[tuple[dict, dict]]:
    """(controller, pod template) of every workload controller."""
    return [(o, o["spec"]["template"]) for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
