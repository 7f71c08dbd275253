"""identityd with no --pods: the pod inventory is a watch of the (double) API server,
reached through a kubeconfig, exactly as `identityd serve` builds it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from identityd.devca.workload import DevCluster
from identityd.settings import ClusterSettings
from tests.conftest import Pods, Service, make_settings, start_service
from tests.doubles.kube_apiserver import KubeAPIServer
from tests.doubles.kube_inventory import write_kubeconfig


@pytest.fixture
async def api(cluster: DevCluster, pods: Pods) -> AsyncIterator[KubeAPIServer]:
    async with KubeAPIServer() as server:
        for pod in (pods.api, pods.other):
            server.add_pod(
                pod.namespace,
                pod.name,
                uid=pod.uid,
                service_account=pod.service_account,
                ip=pod.ip,
                node=pod.node,
            )
        yield server


@pytest.fixture
async def cluster_service(
    api: KubeAPIServer, cluster: DevCluster, tmp_path: Path
) -> AsyncIterator[Service]:
    settings = make_settings(cluster, tmp_path)
    settings = replace(
        settings,
        pods=None,
        cluster=ClusterSettings(
            kubeconfig=write_kubeconfig(tmp_path / "kubeconfig", api), staleness_seconds=60
        ),
    )
    server, svc = await start_service(settings)
    try:
        for _ in range(200):
            if (await svc.get("/readyz"))[0] == 200:
                break
            await asyncio.sleep(0.02)
        yield svc
    finally:
        await svc.http.close()
        await server.close()
        await svc.edges.aclose()


async def test_pods_from_the_watch_are_allowed_and_deletion_is_seen(
    cluster_service: Service, api: KubeAPIServer, cluster: DevCluster, pods: Pods
) -> None:
    status, answer = await cluster_service.post("instance", cluster.confirmation(pods.api))
    assert status == 200, answer
    api.delete_pod(pods.api.namespace, pods.api.name)
    for _ in range(200):
        status, answer = await cluster_service.post("instance", cluster.confirmation(pods.api))
        if status == 403:
            break
        await asyncio.sleep(0.02)
    assert (status, answer["message"]) == (403, "POD_NOT_FOUND")


async def test_a_pod_newer_than_the_watch_is_read_through(
    cluster_service: Service, api: KubeAPIServer, cluster: DevCluster, pods: Pods
) -> None:
    with api.muted():  # the watch does not deliver it; only a GET can find it
        fresh = cluster.add_pod("sports-web", "api-new", "api", "10.1.2.8")
        api.add_pod(
            fresh.namespace,
            fresh.name,
            uid=fresh.uid,
            service_account="api",
            ip=fresh.ip,
            node=fresh.node,
        )
        status, answer = await cluster_service.post("instance", cluster.confirmation(fresh))
    assert status == 200, answer


async def test_not_ready_until_listed(
    api: KubeAPIServer, cluster: DevCluster, tmp_path: Path, pods: Pods
) -> None:
    await api.pause()
    settings = replace(
        make_settings(cluster, tmp_path),
        pods=None,
        cluster=ClusterSettings(kubeconfig=write_kubeconfig(tmp_path / "kubeconfig", api)),
    )
    server, svc = await start_service(settings)
    try:
        assert (await svc.get("/readyz"))[0] == 503
        status, answer = await svc.post("instance", cluster.confirmation(pods.api))
        assert (status, answer["message"]) == (503, "INVENTORY_UNAVAILABLE")
        await api.resume()
        for _ in range(300):
            if (await svc.get("/readyz"))[0] == 200:
                break
            await asyncio.sleep(0.02)
        status, _ = await svc.post("instance", cluster.confirmation(pods.api))
        assert status == 200
    finally:
        await svc.http.close()
        await server.close()
        await svc.edges.aclose()


def requested_token(api: KubeAPIServer, pod: object, audiences: list[str]) -> str:
    """A bound token from the double's TokenRequest, as a kubelet would project it."""
    answer = api.tokens.request_token(
        pod.namespace,
        pod.service_account,
        {  # type: ignore[attr-defined]
            "audiences": audiences,
            "expirationSeconds": 3600,
            "boundObjectRef": {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": pod.name,  # type: ignore[attr-defined]
                "uid": pod.uid,
            },
        },
    )  # type: ignore[attr-defined]
    return str(answer["status"]["token"])


@pytest.fixture(params=["jwks-from-api-server", "tokenreview"])
async def token_mode_service(
    request: pytest.FixtureRequest, api: KubeAPIServer, cluster: DevCluster, tmp_path: Path
) -> AsyncIterator[Service]:
    settings = make_settings(cluster, tmp_path)
    tokens = replace(
        settings.tokens,
        jwks=None,
        issuer=api.tokens.issuer,
        refetch_interval_seconds=0.2,
        mode="tokenreview" if request.param == "tokenreview" else "jwks",
    )
    settings = replace(
        settings,
        pods=None,
        tokens=tokens,
        cluster=ClusterSettings(kubeconfig=write_kubeconfig(tmp_path / "kubeconfig", api)),
    )
    server, svc = await start_service(settings)
    try:
        for _ in range(200):
            if (await svc.get("/readyz"))[0] == 200:
                break
            await asyncio.sleep(0.02)
        yield svc
    finally:
        await svc.http.close()
        await server.close()
        await svc.edges.aclose()


async def test_cluster_tokens_verify_through_the_api_server(
    token_mode_service: Service, api: KubeAPIServer, cluster: DevCluster, pods: Pods
) -> None:
    good = requested_token(api, pods.api, ["identityd"])
    status, answer = await token_mode_service.post(
        "instance", cluster.confirmation(pods.api, token=good)
    )
    assert status == 200, answer
    # A token the API server minted for another audience is refused.
    other = requested_token(api, pods.api, ["vault"])
    status, answer = await token_mode_service.post(
        "instance", cluster.confirmation(pods.api, token=other)
    )
    assert status == 403
    assert answer["message"] in ("TOKEN_AUDIENCE_MISMATCH", "TOKEN_REVIEW_DENIED")
    # A token from the dev issuer (not the API server's keys) is refused.
    status, _ = await token_mode_service.post("instance", cluster.confirmation(pods.api))
    assert status == 403


async def test_key_rotation_on_the_api_server_is_picked_up(
    token_mode_service: Service, api: KubeAPIServer, cluster: DevCluster, pods: Pods
) -> None:
    first = requested_token(api, pods.api, ["identityd"])
    assert (await token_mode_service.post("instance", cluster.confirmation(pods.api, token=first)))[
        0
    ] == 200
    api.tokens.rotate(keep_old=False)
    rotated = requested_token(api, pods.api, ["identityd"])
    await asyncio.sleep(0.25)  # past the unknown-kid refetch interval (a flood guard)
    status, answer = await token_mode_service.post(
        "instance", cluster.confirmation(pods.api, token=rotated)
    )
    assert status == 200, answer


def policy_configmap(name: str, data: dict[str, str], namespace: str = "identityd-system") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"openpolicyagent.org/policy": "rego"},
        },
        "data": data,
    }


async def test_policies_from_configmaps_are_enforced_and_status_written(
    api: KubeAPIServer, cluster: DevCluster, pods: Pods, tmp_path: Path
) -> None:
    from identityd.policy.sources import load_policy_dir
    from tests.conftest import POLICIES

    modules = {Path(k).name: v for k, v in load_policy_dir(POLICIES).items()}
    api.put("configmaps", policy_configmap("identityd-policies", modules))
    settings = replace(
        make_settings(cluster, tmp_path),
        policies=None,
        policy_configmap_namespaces=("identityd-system",),
        leader_elect=True,
        cluster=ClusterSettings(kubeconfig=write_kubeconfig(tmp_path / "kubeconfig", api)),
    )
    server, svc = await start_service(settings)
    try:
        status, answer = await svc.post("instance", cluster.confirmation(pods.api))
        assert status == 200, answer
        for _ in range(200):
            meta = api.store.get("configmaps", "identityd-system", "identityd-policies")["metadata"]
            if "openpolicyagent.org/kube-mgmt-status" in meta.get("annotations", {}):
                break
            await asyncio.sleep(0.02)
        assert meta["annotations"]["openpolicyagent.org/kube-mgmt-status"] == '{"status":"ok"}'
        assert api.store.get("leases", "identityd-system", "identityd-policy-status") is not None
        # The operator sees the write-back and the leadership in /metrics.
        _, text = await svc.get("/metrics")
        assert 'identityd_policy_status_writes_total{result="ok"} 1.0' in text
        assert "identityd_policy_status_leader 1.0" in text
    finally:
        await svc.http.close()
        await server.close()
        await svc.edges.aclose()
