"""The agent patch (k8s/patch/sia.yaml) on the example application: `identityd
sia --once` before the app starts and `identityd sia` beside it, reading a bound
token meant for identityd, with the pod's identity from the downward API, and
writing into an in-memory volume the app mounts read-only."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from deploy_support import Obj, container, flag_values, one, pod_spec

DOWNWARD = {
    "POD_NAME": "metadata.name",
    "POD_NAMESPACE": "metadata.namespace",
    "POD_UID": "metadata.uid",
    "POD_IP": "status.podIP",
    "POD_IPS": "status.podIPs",
    "POD_SERVICE_ACCOUNT": "spec.serviceAccountName",
}
# The API server's floor for a projected token's expirationSeconds.
MIN_TOKEN_SECONDS = 600


@pytest.fixture(scope="module")
def app(sia_example: list[Obj]) -> Obj:
    return one(sia_example, "Deployment", "example-app")


def agents(app: Obj) -> list[Obj]:
    return [container(app, "identityd-sia-init"), container(app, "identityd-sia")]


def volume(app: Obj, name: str) -> Obj:
    found: list[Obj] = [v for v in pod_spec(app)["volumes"] if v["name"] == name]
    assert len(found) == 1, name
    return found[0]


def mounted_file(c: Obj, app: Obj, path: str) -> tuple[Obj, str]:
    """The volume behind ``path`` in container ``c``, and the path inside it."""
    target = PurePosixPath(path)
    for m in c["volumeMounts"]:
        if target.is_relative_to(m["mountPath"]):
            return volume(app, m["name"]), str(target.relative_to(m["mountPath"]))
    raise LookupError(f"{path} is not on a volume of {c['name']}")


def test_init_container_registers_once_and_sidecar_refreshes(app: Obj) -> None:
    spec = pod_spec(app)
    init = [c["name"] for c in spec["initContainers"]]
    assert init == ["identityd-sia-init"]
    assert container(app, "identityd-sia-init")["args"][:2] == ["sia", "--once"]
    sidecar = container(app, "identityd-sia")["args"]
    assert sidecar[0] == "sia" and "--once" not in sidecar
    # Same configuration apart from --once.
    assert container(app, "identityd-sia-init")["args"][2:] == sidecar[1:]


def test_agents_use_the_identityd_image(app: Obj, base: list[Obj]) -> None:
    identityd = container(one(base, "Deployment", "identityd"), "identityd")
    assert {c["image"] for c in agents(app)} == {identityd["image"]}


def test_token_is_bound_to_identityd_and_short_lived(app: Obj, base: list[Obj]) -> None:
    server_args = container(one(base, "Deployment", "identityd"), "identityd")["args"]
    audiences = set(flag_values(server_args, "--audience"))
    for c in agents(app):
        (token_file,) = flag_values(c["args"], "--token-file")
        vol, inside = mounted_file(c, app, token_file)
        (source,) = vol["projected"]["sources"]
        sat = source["serviceAccountToken"]
        assert sat["path"] == inside
        assert sat["audience"] in audiences, "identityd would refuse the token's audience"
        assert MIN_TOKEN_SECONDS <= sat["expirationSeconds"] <= 3600


def test_downward_api_environment(app: Obj) -> None:
    for c in agents(app):
        env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
        assert env == DOWNWARD, c["name"]


def test_certificates_go_to_memory_and_the_app_reads_them(app: Obj) -> None:
    for c in agents(app):
        (out_dir,) = flag_values(c["args"], "--out-dir")
        vol, inside = mounted_file(c, app, out_dir + "/cert.pem")
        assert vol["emptyDir"]["medium"] == "Memory" and inside == "cert.pem"
        mount = next(m for m in c["volumeMounts"] if m["name"] == vol["name"])
        assert not mount.get("readOnly"), "the agent must write there"
    app_mounts = container(app, "app")["volumeMounts"]
    assert {(m["name"], m.get("readOnly")) for m in app_mounts} == {("identityd-certs", True)}


def test_only_the_agents_see_the_token(app: Obj) -> None:
    for c in pod_spec(app)["containers"]:
        names = {m["name"] for m in c.get("volumeMounts") or []}
        assert ("identityd-token" in names) == c["name"].startswith("identityd-sia"), c["name"]
