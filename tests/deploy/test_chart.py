"""The chart rendered by Helm's engine for every preset: Kubernetes schemas (every AKS minor),
the security settings, the measured launch, yamllint, the values schema."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from safehold.deploy.workloads import KUBERNETES_VERSIONS, POD_PLATFORM_ENV, WORKLOADS
from tests.deploy.chart import (
    CHART,
    PRESETS,
    ROOT,
    chart_tool,
    objects,
    pod_specs,
    preset_values,
    render,
    rendered,
)

CASES = [(p, False) for p in PRESETS] + [(p, True) for p in PRESETS]
CATALOGUE = json.loads((CHART / "files" / "workloads.json").read_text("utf-8"))["workloads"]


def test_presets_exist() -> None:
    assert set(PRESETS) == {"aks-sgx", "aks-cvm", "kind-dev"}


@pytest.mark.slow  # about 3 s per case: 7 schema versions
@pytest.mark.parametrize(("preset", "all_on"), CASES)
def test_every_object_is_valid_for_every_kubernetes_version(preset: str, all_on: bool) -> None:
    kubernetes_validate = chart_tool("kubernetes_validate")

    objs = objects(preset, all_on=all_on)
    assert len(objs) >= 14
    errors = []
    for version in KUBERNETES_VERSIONS:
        for o in objs:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{version} {o['kind']}/{o['metadata']['name']}: {e.message}")
    assert errors == []


def test_kubernetes_validate_catches_what_it_should() -> None:
    """The validator is not a no-op: the mistakes of the official snippets are errors."""
    kubernetes_validate = chart_tool("kubernetes_validate")

    objs = objects("aks-cvm")
    dep = next(o for o in objs if o["kind"] == "Deployment")
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["env"][0] = {"name": "X", "value": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["container"] = bad["spec"]["template"]["spec"].pop("containers")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_pods_are_locked_down(preset: str) -> None:
    objs = objects(preset, all_on=True)
    for ctrl, tpl in pod_specs(objs):
        spec = tpl["spec"]
        name = ctrl["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsUser"] >= 10000, name
            assert "@sha256:" in c["image"], name
            for p in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert set(c[p]) - {"periodSeconds", "failureThreshold"} == {"tcpSocket"}, (name, p)
            assert all(isinstance(e.get("value", ""), str) for e in c.get("env", [])), name
            for r in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][r]), name


@pytest.mark.parametrize("preset", list(PRESETS))
def test_workload_pods_run_the_measured_launch(preset: str) -> None:
    """Under cvm / simulated the container command is the launch of safehold.deploy.workloads;
    under sgx there is none (the GSC image's signed entrypoint). Either way the pod's variables
    are inside the launch's allow-list (BOOT refuses any other), Service links are off."""
    mode = preset_values(preset)["tee"]["mode"]
    for ctrl, tpl in pod_specs(objects(preset, all_on=True)):
        comp = ctrl["metadata"]["labels"]["app.kubernetes.io/component"]
        if comp == "postgresql":
            continue
        spec = tpl["spec"]
        c = spec["containers"][0]
        assert spec["enableServiceLinks"] is False
        if mode == "sgx":
            assert "command" not in c and "args" not in c
        else:
            assert c["command"] == WORKLOADS[comp].argv() == CATALOGUE[comp]["command"]
        names = {e["name"] for e in c.get("env", [])}
        assert names <= set(WORKLOADS[comp].passthrough)
        assert names | set(POD_PLATFORM_ENV) == set(WORKLOADS[comp].passthrough)


def test_sgx_pods_request_epc_and_reach_aesmd() -> None:
    for ctrl, tpl in pod_specs(objects("aks-sgx", all_on=True)):
        comp = ctrl["metadata"]["labels"]["app.kubernetes.io/component"]
        c = tpl["spec"]["containers"][0]
        for r in ("requests", "limits"):
            assert c["resources"][r]["sgx.intel.com/epc"] == WORKLOADS[comp].epc
        text = json.dumps(tpl)
        assert "sgx_epc_mem_in_MiB" not in text  # the retired Azure plugin's integer-MiB resource
        assert tpl["metadata"]["annotations"]["sgx.intel.com/quote-provider"] == "aesmd"
        assert {"name": "aesmd", "mountPath": "/var/run/aesmd"} in c["volumeMounts"]
        assert tpl["spec"]["nodeSelector"] == {"kubernetes.azure.com/agentpool": "confcompool1"}


def test_simulated_tee_is_loud() -> None:
    notes = rendered("kind-dev")["safehold/templates/NOTES.txt"]
    assert "NOTHING IN THIS RELEASE IS CONFIDENTIAL" in notes
    for _, tpl in pod_specs(objects("kind-dev")):
        if tpl["metadata"]["labels"]["app.kubernetes.io/component"] == "postgresql":
            continue
        assert "NOT CONFIDENTIAL" in tpl["metadata"]["annotations"]["safehold.io/tee"]
    assert "CONFIDENTIAL" not in rendered("aks-cvm")["safehold/templates/NOTES.txt"]


def test_anchor_members_spread_and_broker_replicas() -> None:
    for preset in PRESETS:
        objs = objects(preset)
        anchor = next(
            o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-anchor")
        )
        spec = anchor["spec"]["template"]["spec"]
        assert anchor["spec"]["replicas"] == 3
        assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
        assert spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        broker = next(
            o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-broker")
        )
        assert broker["spec"]["replicas"] >= 2
        records = next(
            o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-records")
        )
        assert records["spec"]["replicas"] >= 2
        pdbs = {o["metadata"]["name"] for o in objs if o["kind"] == "PodDisruptionBudget"}
        assert {"safehold-broker", "safehold-records", "safehold-anchor"} <= pdbs


def test_network_policies_default_deny_and_cover_every_pod() -> None:
    for preset in PRESETS:
        objs = objects(preset, all_on=True)
        pols = [o for o in objs if o["kind"] == "NetworkPolicy"]
        deny = next(p for p in pols if p["metadata"]["name"].endswith("-default-deny"))
        assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny["spec"]
        assert "egress" not in deny["spec"]
        covered = {p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") for p in pols}
        for ctrl, _ in pod_specs(objs):
            assert ctrl["metadata"]["labels"]["app.kubernetes.io/component"] in covered


def test_values_schema_refuses_what_it_should() -> None:
    HelmValuesError = chart_tool("helm_python").HelmValuesError  # noqa: N806

    base = preset_values("aks-cvm")
    for bad in (
        {"tee": {"mode": "tdx"}},
        {"sgx": {"epcResource": "kubernetes.azure.com/sgx_epc_mem_in_MiB"}},
        {"ownerKey": "x"},
        {"recoveryKeys": ["x"]},
        {"anchor": {"replicas": 1}},
        {"image": {"digest": "latest"}},
    ):
        with pytest.raises(HelmValuesError):
            render({**base, **bad})


def test_chart_refuses_unpinned_images() -> None:
    HelmError = chart_tool("helm_python").HelmError  # noqa: N806

    v = preset_values("aks-sgx")
    del v["images"]["records"]
    with pytest.raises(HelmError, match="images.records"):
        render(v)
    v = preset_values("aks-cvm")
    v["image"]["digest"] = ""
    with pytest.raises(HelmError, match="digest"):
        render(v)


def _yamllint(config: str, files: list) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "yamllint", "-s", "-c", config, *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_yamllint_values_presets_and_rendered(tmp_path) -> None:
    config = str(ROOT / "deploy" / ".yamllint")
    _yamllint(config, [CHART / "values.yaml", CHART / "Chart.yaml", *PRESETS.values()])
    files = []
    for preset in PRESETS:
        out = tmp_path / f"{preset}.yaml"
        out.write_text(
            "".join(
                f"---\n{t}" for p, t in rendered(preset, all_on=True).items() if not p.endswith("NOTES.txt")
            ),
            "utf-8",
        )
        files.append(out)
    # rendered output: the launch's bootstrap program is one long string, so no line limit
    relaxed = tmp_path / "rendered.yamllint"
    relaxed.write_text(f"extends: {config}\nrules:\n  line-length: disable\n", "utf-8")
    _yamllint(str(relaxed), files)


def test_helm_lint_is_clean() -> None:
    lint = chart_tool("helm_python").lint

    for preset in PRESETS:
        report = lint(
            str(CHART), preset_values(preset), strict=True, kube_version=f"v{KUBERNETES_VERSIONS[0]}"
        )
        assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_committed_workload_file_is_generated() -> None:
    from safehold.deploy.workloads import chart_json

    assert (CHART / "files" / "workloads.json").read_text("utf-8") == chart_json(), (
        "regenerate: safehold deploy chart-workloads --out deploy/helm/safehold/files/workloads.json"
    )


def test_rendered_yaml_round_trips() -> None:
    for preset in PRESETS:
        for o in objects(preset):
            assert yaml.safe_load(yaml.safe_dump(o)) == o
