"""The rendered base (`kubectl kustomize k8s/`) has the shape issue 6 asks for:
hardened pods, two spread replicas behind a PodDisruptionBudget, probes on the
plain metrics port, OPA on loopback, separate callback and metrics Services,
the TLS secrets mounted where identityd reads them, and a NetworkPolicy."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from deploy_support import (
    K8S,
    K8S_PATCH,
    REPO,
    SYSTEM_NAMESPACE,
    Obj,
    all_containers,
    container,
    find,
    flag_values,
    load_yaml_file,
    one,
    pod_spec,
)

from identityd.settings import host_port
from identityd.tokens.key_sources import is_api_server_url

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
# A release tag (optionally its -static build), never a floating one.
OPA_IMAGE = re.compile(r"^openpolicyagent/opa:(?P<major>\d+)\.\d+\.\d+(?:-static)?$")


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def hardening_problems(c: Obj) -> Iterator[str]:
    """Where a container's own securityContext falls short of "restricted"."""
    sc = c.get("securityContext") or {}
    if sc.get("runAsNonRoot") is not True:
        yield "runAsNonRoot is not true"
    if sc.get("runAsUser") == 0:
        yield "runAsUser is 0"
    if sc.get("readOnlyRootFilesystem") is not True:
        yield "readOnlyRootFilesystem is not true"
    if sc.get("allowPrivilegeEscalation") is not False:
        yield "allowPrivilegeEscalation is not false"
    if sc.get("privileged"):
        yield "privileged"
    caps = sc.get("capabilities") or {}
    if caps.get("drop") != ["ALL"] or caps.get("add"):
        yield "capabilities are not drop [ALL] with nothing added"
    if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        yield "seccompProfile is not RuntimeDefault"


def pod_problems(spec: Obj) -> Iterator[str]:
    sc = spec.get("securityContext") or {}
    if sc.get("runAsNonRoot") is not True:
        yield "pod runAsNonRoot is not true"
    if not isinstance(sc.get("runAsUser"), int) or sc["runAsUser"] == 0:
        yield "pod runAsUser is not a non-zero number"
    if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        yield "pod seccompProfile is not RuntimeDefault"
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            yield f"pod uses {key}"
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            yield f"volume {volume['name']} is a hostPath"


@pytest.fixture(scope="module")
def deployment(base: list[Obj]) -> Obj:
    return one(base, "Deployment", "identityd")


@pytest.fixture(scope="module")
def args(deployment: Obj) -> list[str]:
    a: list[str] = container(deployment, "identityd")["args"]
    return a


def port_of(address: str) -> int:
    return host_port(address)[1]


# -- hardening -------------------------------------------------------------


def test_every_container_and_pod_is_hardened(base: list[Obj], sia_example: list[Obj]) -> None:
    problems = []
    for objs in (base, sia_example):
        for w in workloads(objs):
            name = w["metadata"]["name"]
            problems += [f"{name}: {p}" for p in pod_problems(pod_spec(w))]
            for c in all_containers(w):
                problems += [f"{name}/{c['name']}: {p}" for p in hardening_problems(c)]
    assert problems == []


def test_the_hardening_check_can_fail() -> None:
    assert list(hardening_problems({"name": "x"})) != []
    weak = {
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    }
    assert list(hardening_problems(weak)) == ["capabilities are not drop [ALL] with nothing added"]


def test_every_container_has_requests_and_a_memory_limit(
    base: list[Obj], sia_example: list[Obj]
) -> None:
    for objs in (base, sia_example):
        for w in workloads(objs):
            for c in all_containers(w):
                res = c.get("resources") or {}
                assert {"cpu", "memory"} <= set(res.get("requests") or {}), c["name"]
                assert "memory" in (res.get("limits") or {}), c["name"]


def test_the_namespace_enforces_the_restricted_pod_security_profile(base: list[Obj]) -> None:
    labels = one(base, "Namespace", SYSTEM_NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_objects_live_in_the_system_namespace(base: list[Obj]) -> None:
    for obj in base:
        meta = obj["metadata"]
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, obj["kind"]
        else:
            assert meta.get("namespace") == SYSTEM_NAMESPACE, (obj["kind"], meta["name"])


# -- availability ----------------------------------------------------------


def test_two_replicas_spread_over_nodes(deployment: Obj) -> None:
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_labels = spec["template"]["metadata"]["labels"]
    terms = pod_spec(deployment)["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    by_key = {t["podAffinityTerm"]["topologyKey"]: t["podAffinityTerm"] for t in terms}
    hostname = by_key["kubernetes.io/hostname"]
    assert hostname["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_the_disruption_budget_keeps_one_replica(base: list[Obj], deployment: Obj) -> None:
    pdb = one(base, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_probes_use_the_plain_metrics_port(deployment: Obj, args: list[str]) -> None:
    c = container(deployment, "identityd")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    (metrics_listen,) = flag_values(args, "--metrics-listen")
    (listen,) = flag_values(args, "--listen")
    assert ports["metrics"] == port_of(metrics_listen) != port_of(listen) == ports["https"]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert (get["path"], get["port"], get.get("scheme", "HTTP")) == (path, "metrics", "HTTP")


def test_identityd_runs_one_worker_per_pod(args: list[str]) -> None:
    # os.cpu_count() sees the node's cores, not the container's limit.
    assert flag_values(args, "--workers") == ["1"]


# -- OPA sidecar -----------------------------------------------------------


def test_opa_is_pinned_and_listens_on_loopback_only(deployment: Obj, args: list[str]) -> None:
    opa = container(deployment, "opa")
    pinned = OPA_IMAGE.match(opa["image"])
    assert pinned, opa["image"]
    # 1.x parses Rego v1 by default (0.x parses v0: a policy ConfigMap written in v1
    # without `import rego.v1` would not load).
    assert int(pinned["major"]) >= 1, opa["image"]
    assert opa["args"][:2] == ["run", "--server"]
    (addr,) = flag_values(opa["args"], "--addr")
    assert addr.startswith("127.0.0.1:")
    assert flag_values(args, "--opa-url") == [f"http://{addr}"]
    assert flag_values(args, "--engine") == ["opa"]
    (diagnostic,) = flag_values(opa["args"], "--diagnostic-addr")
    assert [p["containerPort"] for p in opa["ports"]] == [port_of(diagnostic)]
    for probe in ("readinessProbe", "livenessProbe"):
        assert opa[probe]["httpGet"]["path"] == "/health"


# -- tokens ----------------------------------------------------------------


def test_tokens_are_checked_with_the_api_servers_keys_fetched_with_its_ca_and_token(
    deployment: Obj, args: list[str],
) -> None:
    """No --jwks: identityd fetches /openid/v1/jwks through its in-cluster client (the
    cluster CA, the rotating service-account token). A bare --jwks URL of the API
    server never loads: the cluster CA is not in the system store and the JWKS needs
    a token (identityd refuses such a flag at start-up)."""
    assert flag_values(args, "--token-mode") == ["jwks"]
    for url in flag_values(args, "--jwks"):
        assert not is_api_server_url(url, service_host="10.96.0.1"), url
    assert flag_values(args, "--jwks") == []
    assert pod_spec(deployment)["automountServiceAccountToken"] is True


def test_images_are_pinned(base: list[Obj], sia_example: list[Obj]) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for objs in (base, sia_example):
        for w in workloads(objs):
            for c in all_containers(w):
                image = c["image"]
                tag = image.rpartition(":")[2]
                assert ":" in image and tag != "latest", image
                if image.rpartition(":")[0].endswith("/identityd"):
                    assert tag == version, f"{image}: the package is {version}"


def test_both_kustomizations_use_the_same_identityd_image() -> None:
    images = [load_yaml_file(path / "kustomization.yaml")[0]["images"] for path in (K8S, K8S_PATCH)]
    assert images[0] == images[1]


# -- Services, TLS, network -----------------------------------------------


def test_callback_and_metrics_are_separate_services(base: list[Obj], deployment: Obj) -> None:
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in find(base, "Service")}
    assert set(services) == {"identityd", "identityd-metrics"}
    shape = {
        name: [(p["port"], p["targetPort"]) for p in s["spec"]["ports"]]
        for name, s in services.items()
    }
    assert shape == {"identityd": [(8443, "https")], "identityd-metrics": [(9090, "metrics")]}
    for s in services.values():
        assert s["spec"]["selector"].items() <= pod_labels.items()
        assert s["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_tls_files_come_from_mounted_secrets(deployment: Obj, args: list[str]) -> None:
    c = container(deployment, "identityd")
    secrets = {v["name"] for v in pod_spec(deployment)["volumes"] if "secret" in v}
    mounts = {PurePosixPath(m["mountPath"]): m for m in c["volumeMounts"]}
    for flag in ("--tls-cert", "--tls-key", "--client-ca"):
        (path,) = flag_values(args, flag)
        mount = mounts[PurePosixPath(path).parent]
        assert mount["name"] in secrets and mount.get("readOnly") is True, flag
    assert flag_values(args, "--allowed-client"), "ZTS's client certificate is not pinned"


def test_network_policy_admits_only_callbacks_and_scrapes(base: list[Obj], deployment: Obj) -> None:
    (policy,) = find(base, "NetworkPolicy")
    spec = policy["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    ingress_ports = sorted(p["port"] for rule in spec["ingress"] for p in rule["ports"])
    assert ingress_ports == [8443, 9090]
    for rule in spec["ingress"]:
        assert rule.get("from"), "an ingress rule without sources admits everyone"
    egress = {(p["port"], p["protocol"]) for rule in spec["egress"] for p in rule["ports"]}
    assert egress == {(53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP")}


# -- kustomize -------------------------------------------------------------

# What the kustomize inside kubectl 1.20 (Debian's kubernetes-client) knows.
# CI renders with that kubectl when it installs it; this keeps a newer kubectl
# on PATH from hiding a field the old one would refuse.
KUSTOMIZE_V2_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "namePrefix",
    "nameSuffix",
    "commonLabels",
    "commonAnnotations",
    "resources",
    "bases",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "images",
    "patchesStrategicMerge",
    "patchesJson6902",
    "vars",
    "configurations",
    "crds",
}


@pytest.mark.parametrize("root", [K8S, K8S_PATCH], ids=["base", "patch"])
def test_kustomizations_keep_to_kustomize_v2(root: Path) -> None:
    (kustomization,) = load_yaml_file(root / "kustomization.yaml")
    assert set(kustomization) <= KUSTOMIZE_V2_FIELDS
    for resource in kustomization.get("resources") or []:
        assert (root / resource).is_file(), f"{resource}: kustomize v2 takes files only"
