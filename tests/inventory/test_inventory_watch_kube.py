"""identityd.kubeapi: client configuration (explicit host, kubeconfig, in-cluster)
and the translation of the API server's failures, against the API-server double."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from identityd.errors import ConfigError, Unavailable
from identityd.kubeapi import KubeAPIError, KubeConnection, PodsAPI
from tests.doubles.kube_apiserver import KubeAPIServer


@pytest.fixture
async def api() -> AsyncIterator[KubeAPIServer]:
    async with KubeAPIServer(token="kubeconfig-token") as server:
        server.add_pod("ns", "a")
        yield server


def kubeconfig(path: Path, server: str, token: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "double",
        "clusters": [{"name": "double", "cluster": {"server": server}}],
        "users": [{"name": "bench", "user": {"token": token}}],
        "contexts": [{"name": "double", "context": {"cluster": "double", "user": "bench"}}],
    }))
    return path


async def test_kubeconfig_connection(api: KubeAPIServer, tmp_path: Path) -> None:
    path = kubeconfig(tmp_path / "config", api.url, api.token)
    pods = await PodsAPI.connect(KubeConnection(kubeconfig=str(path)))
    try:
        names, _ = await pods.list_all(None, lambda o: o["metadata"]["name"], limit=0,
                                       request_timeout=2)
        assert names == ["a"]
    finally:
        await pods.aclose()
    assert api.requests[-1].headers["Authorization"] == "Bearer kubeconfig-token"


async def test_wrong_token_is_an_api_error_not_a_crash(api: KubeAPIServer) -> None:
    pods = await PodsAPI.connect(KubeConnection(host=api.url, token="wrong"))
    try:
        with pytest.raises(KubeAPIError) as caught:
            await pods.get("ns", "a", request_timeout=2)
        assert caught.value.status == 401 and caught.value.reason == "Unauthorized"
        assert isinstance(caught.value, Unavailable)
        assert "wrong" not in str(caught.value)  # a credential never enters an error
    finally:
        await pods.aclose()


async def test_missing_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        await PodsAPI.connect(KubeConnection(kubeconfig=str(tmp_path / "absent")))
    assert caught.value.code == "KUBE_CONFIG_INVALID"


async def test_in_cluster_outside_a_cluster_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    with pytest.raises(ConfigError) as caught:
        await PodsAPI.connect(KubeConnection())
    assert caught.value.code == "KUBE_CONFIG_INVALID"


async def test_unreachable_server_is_kube_unreachable() -> None:
    async with KubeAPIServer() as api:
        url = api.url
    pods = await PodsAPI.connect(KubeConnection(host=url, token="t"))
    try:
        with pytest.raises(KubeAPIError) as caught:
            await pods.get("ns", "a", request_timeout=2)
        assert caught.value.code == "KUBE_UNREACHABLE" and caught.value.status == 0
    finally:
        await pods.aclose()
