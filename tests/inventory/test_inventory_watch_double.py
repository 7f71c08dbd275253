"""The API-server double itself, through the real kubernetes_asyncio client where it
matters: the wire format other tests rely on (lists, paging, watches, 410, selectors,
GET, ConfigMap patch, auth, faults)."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from identityd.kubeapi import MAX_LIST_RESTARTS, KubeAPIError, PodsAPI, new_api_client
from tests.doubles.kube_apiserver import KubeAPIServer, json_patch, merge_patch
from tests.doubles.kube_inventory import connection_to
from tests.doubles.kube_store import label_predicate
from tests.doubles.waiting import eventually


@pytest.fixture
async def api() -> AsyncIterator[KubeAPIServer]:
    async with KubeAPIServer() as server:
        yield server


@pytest.fixture
async def pods(api: KubeAPIServer) -> AsyncIterator[PodsAPI]:
    client = PodsAPI(await new_api_client(connection_to(api)))
    yield client
    await client.aclose()


@pytest.fixture
async def core(api: KubeAPIServer) -> AsyncIterator[k8s.CoreV1Api]:
    client = await new_api_client(connection_to(api))
    yield k8s.CoreV1Api(client)
    await client.close()


def names(items: list[dict[str, Any]]) -> list[str]:
    return [item["metadata"]["name"] for item in items]


async def list_pods(core: k8s.CoreV1Api, namespace: str | None = None,
                    **params: Any) -> tuple[int, dict[str, Any]]:
    """One list request through the real client, as status and raw JSON."""
    resp: Any
    if namespace is None:
        resp = await core.list_pod_for_all_namespaces(_preload_content=False, **params)
    else:
        resp = await core.list_namespaced_pod(namespace, _preload_content=False, **params)
    try:
        return resp.status, json.loads(await resp.read())
    finally:
        resp.release()


async def test_list_is_in_key_order_with_the_current_resource_version(
    api: KubeAPIServer, core: k8s.CoreV1Api
) -> None:
    api.add_pod("b", "x")
    api.add_pod("a", "y")
    api.add_pod("a", "x")
    status, body = await list_pods(core)
    assert status == 200 and body["kind"] == "PodList"
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in body["items"]] == [
        ("a", "x"), ("a", "y"), ("b", "x")]
    assert body["metadata"] == {"resourceVersion": str(api.store.rv)}
    _, only_a = await list_pods(core, "a")
    assert names(only_a["items"]) == ["x", "y"]


async def test_pages_continue_only_while_more_match(
    api: KubeAPIServer, core: k8s.CoreV1Api
) -> None:
    for name in "abcd":
        api.add_pod("ns", name)
    _, first = await list_pods(core, limit=2)
    _, second = await list_pods(core, limit=2, _continue=first["metadata"]["continue"])
    assert names(first["items"] + second["items"]) == list("abcd")
    assert "continue" not in second["metadata"]  # no empty page at the end


async def test_later_pages_are_as_of_the_first(api: KubeAPIServer, core: k8s.CoreV1Api) -> None:
    for name in "abcdef":
        api.add_pod("ns", name)
    _, first = await list_pods(core, limit=2)
    api.delete_pod("ns", "d")  # not listed yet: must still appear
    api.add_pod("ns", "cc")  # created after the snapshot: must not
    api.update_pod("ns", "e", lambda p: p["metadata"]["labels"].update(v="2"))
    _, rest = await list_pods(core, _continue=first["metadata"]["continue"])
    assert names(first["items"] + rest["items"]) == list("abcdef")
    assert rest["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert "v" not in rest["items"][2]["metadata"]["labels"]  # e as it was


async def test_continue_token_older_than_the_window_is_410(
    api: KubeAPIServer, core: k8s.CoreV1Api, pods: PodsAPI
) -> None:
    for name in "abc":
        api.add_pod("ns", name)
    _, first = await list_pods(core, limit=1)
    api.add_pod("ns", "d")
    api.compact()
    status, body = await list_pods(core, limit=1, _continue=first["metadata"]["continue"])
    assert status == 410 and body["reason"] == "Expired" and body["code"] == 410
    # list_all starts over from the first page, in pages still: an unpaged list of
    # every pod is what paging is there to avoid.
    api.set_delay(0.05, path="continue=")
    api.requests.clear()
    listing = asyncio.create_task(pods.list_all(None, dict, limit=1, request_timeout=2))
    await eventually(lambda: any("continue" in r.query for r in api.requests))
    api.compact()  # while the second page is on its way
    api.add_pod("ns", "e")
    api.compact()
    found, rv = await listing
    assert names(found) == list("abcde") and rv == str(api.store.rv)
    queries = [r.query for r in api.requests]
    assert [q.get("limit") for q in queries] == ["1"] * 7  # 2 pages, then 5 from the top
    assert ["continue" in q for q in queries[:3]] == [False, True, False]

    # A token that keeps expiring: MAX_LIST_RESTARTS restarts, then its own code.
    api.set_delay(0)
    api.requests.clear()
    api.fail_next(MAX_LIST_RESTARTS + 1, 410, path="continue=")
    with pytest.raises(KubeAPIError) as caught:
        await pods.list_all(None, dict, limit=1, request_timeout=2)
    assert caught.value.code == "KUBE_CONTINUE_EXPIRED" and caught.value.expired
    firsts = [r for r in api.requests if "continue" not in r.query]
    assert len(firsts) == MAX_LIST_RESTARTS + 1
    assert all(r.query.get("limit") == "1" for r in api.requests)


async def test_list_all_pages_and_converts(api: KubeAPIServer, pods: PodsAPI) -> None:
    for i in range(7):
        api.add_pod("ns", f"p{i}", labels={"odd": str(i % 2)})
    found, rv = await pods.list_all(
        None, lambda obj: obj["metadata"]["name"] if obj["metadata"]["labels"]["odd"] == "1"
        else None, limit=2, request_timeout=2)
    assert found == ["p1", "p3", "p5"] and rv == str(api.store.rv)
    assert [r.query.get("limit") for r in api.requests] == ["2"] * 4


async def test_watch_from_an_old_resource_version_gets_an_expired_error_event(
    api: KubeAPIServer,
) -> None:
    api.add_pod("ns", "a")
    old = api.store.rv
    api.add_pod("ns", "b")
    api.compact()
    headers = {"Authorization": f"Bearer {api.token}"}
    params = {"watch": "1", "resourceVersion": str(old)}
    async with (aiohttp.ClientSession(headers=headers) as http,
                http.get(f"{api.url}/api/v1/pods", params=params) as resp):
        assert resp.status == 200
        lines = (await resp.read()).splitlines()  # the stream ends after the error
    event = json.loads(lines[0])
    assert len(lines) == 1 and event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status" and event["object"]["code"] == 410
    assert event["object"]["reason"] == "Expired"


async def test_watch_without_resource_version_starts_with_the_current_state(
    api: KubeAPIServer, pods: PodsAPI
) -> None:
    api.add_pod("ns", "a")
    stream = await pods.watch("ns", resource_version="", timeout_seconds=5,
                              connect_timeout=1, inactivity_timeout=2)
    try:
        first = await stream.next()
        assert first is not None and first["type"] == "ADDED"
        api.add_pod("ns", "b")
        second = await stream.next()
        assert second is not None and names([second["object"]]) == ["b"]
    finally:
        stream.close()


async def test_watch_with_a_selector_sees_objects_enter_and_leave_it(
    api: KubeAPIServer, pods: PodsAPI
) -> None:
    api.add_pod("ns", "p", labels={"app": "a"})
    stream = await pods.watch(None, resource_version=str(api.store.rv), timeout_seconds=5,
                              label_selector="app=a", connect_timeout=1, inactivity_timeout=2)
    try:
        api.update_pod("ns", "p", lambda p: p["metadata"]["labels"].update(app="b"))
        api.update_pod("ns", "p", lambda p: p["metadata"]["labels"].update(v="1"))  # unseen
        api.update_pod("ns", "p", lambda p: p["metadata"]["labels"].update(app="a"))
        api.update_pod("ns", "p", lambda p: p["metadata"]["labels"].update(v="2"))
        kinds = [(await stream.next() or {}).get("type") for _ in range(3)]
        assert kinds == ["DELETED", "ADDED", "MODIFIED"]
    finally:
        stream.close()


async def test_watch_ends_cleanly_at_timeout_seconds_even_when_busy(
    api: KubeAPIServer, pods: PodsAPI
) -> None:
    stream = await pods.watch(None, resource_version=str(api.store.rv), timeout_seconds=1,
                              connect_timeout=1, inactivity_timeout=3)
    try:
        async with asyncio.timeout(3):
            count = 0
            while True:
                api.add_pod("ns", f"p{count}")
                if await stream.next() is None:
                    break
                count += 1
        assert count > 10
    finally:
        stream.close()


async def watch_lines(api: KubeAPIServer, rv: str, seconds: float) -> list[dict[str, Any]]:
    """Every event of a raw watch from ``rv`` with bookmarks, until it ends."""
    headers = {"Authorization": f"Bearer {api.token}"}
    params = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true",
              "timeoutSeconds": str(seconds)}
    async with (aiohttp.ClientSession(headers=headers) as http,
                http.get(f"{api.url}/api/v1/namespaces/mine/pods", params=params) as resp):
        return [json.loads(line) for line in (await resp.read()).splitlines()]


async def test_bookmarks_come_only_above_the_watch_start() -> None:
    """The watch cache's rule: a bookmark at or below the resourceVersion the watch
    started from is never sent, so a watch on a quiet cluster carries no byte at all."""
    async with KubeAPIServer(bookmark_interval=0.05) as api:
        api.add_pod("mine", "a")
        quiet = asyncio.create_task(watch_lines(api, str(api.store.rv), 1))
        await api.wait_for_watches(1)
        api.send_bookmark()  # at the start's resourceVersion: dropped
        assert await quiet == []

        start = api.store.rv
        moved = asyncio.create_task(watch_lines(api, str(start), 1))
        await api.wait_for_watches(1)
        api.add_pod("elsewhere", "b")  # not ours, but moves the resourceVersion
        events = await moved
        assert events and {e["type"] for e in events} == {"BOOKMARK"}
        assert {e["object"]["metadata"]["resourceVersion"] for e in events} == {str(start + 1)}


async def test_send_line_writes_a_raw_line_between_events(
    api: KubeAPIServer, pods: PodsAPI
) -> None:
    stream = await pods.watch("ns", resource_version=str(api.store.rv), timeout_seconds=5,
                              connect_timeout=1, inactivity_timeout=2)
    try:
        await api.wait_for_watches(1)
        api.add_pod("ns", "a")
        api.send_line(b"not json\n")
        first = await stream.next()
        assert first is not None and names([first["object"]]) == ["a"]
        with pytest.raises(KubeAPIError) as caught:
            await stream.next()
        assert caught.value.code == "KUBE_BAD_RESPONSE"
    finally:
        stream.close()


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("app=a", {"app": "a"}, True),
        ("app==a", {"app": "b"}, False),
        ("app!=a", {}, True),
        ("app in (a, b),tier", {"app": "b", "tier": "x"}, True),
        ("app notin (a,b)", {"app": "b"}, False),
        ("!tier", {"tier": "x"}, False),
        ("", {"anything": "x"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert label_predicate(selector)({"metadata": {"labels": labels}}) is expected


async def test_bad_selector_is_400(api: KubeAPIServer, pods: PodsAPI) -> None:
    with pytest.raises(KubeAPIError) as caught:
        await pods.list_all(None, dict, limit=0, label_selector="a in b", request_timeout=2)
    assert caught.value.status == 400


async def test_get_pod_and_its_404_status(api: KubeAPIServer, pods: PodsAPI) -> None:
    pod = api.add_pod("ns", "a")
    assert await pods.get("ns", "a", request_timeout=2) == pod
    assert await pods.get("ns", "b", request_timeout=2) is None
    headers = {"Authorization": f"Bearer {api.token}"}
    async with (aiohttp.ClientSession(headers=headers) as http,
                http.get(f"{api.url}/api/v1/namespaces/ns/pods/b") as resp):
        assert resp.status == 404
        assert await resp.json() == {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": 'pods "b" not found', "reason": "NotFound",
            "details": {"name": "b", "kind": "pods"}, "code": 404}


async def test_requests_without_the_token_are_401(api: KubeAPIServer) -> None:
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with http.get(f"{api.url}/api/v1/pods", headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["reason"] == "Unauthorized"


async def test_large_lists_are_gzipped_when_the_client_accepts_it(api: KubeAPIServer) -> None:
    for i in range(200):
        api.add_pod("ns", f"pod-{i:03d}")
    headers = {"Authorization": f"Bearer {api.token}", "Accept-Encoding": "gzip"}
    async with (aiohttp.ClientSession(auto_decompress=False) as http,
                http.get(f"{api.url}/api/v1/pods", headers=headers) as resp):
        assert resp.headers["Content-Encoding"] == "gzip"
        assert len(json.loads(gzip.decompress(await resp.read()))["items"]) == 200


async def test_faults_fail_next_and_pause(api: KubeAPIServer, pods: PodsAPI) -> None:
    api.fail_next(1, 503, path="/api/v1/pods")
    with pytest.raises(KubeAPIError) as caught:
        await pods.list_all(None, dict, limit=0, request_timeout=2)
    assert caught.value.status == 503
    await pods.list_all(None, dict, limit=0, request_timeout=2)  # only the next one failed
    await api.pause()
    with pytest.raises(KubeAPIError) as refused:
        await pods.list_all(None, dict, limit=0, request_timeout=2)
    assert refused.value.code == "KUBE_UNREACHABLE"
    await api.resume()
    await pods.list_all(None, dict, limit=0, request_timeout=2)


async def test_configmaps_list_get_watch_and_patch(api: KubeAPIServer, core: k8s.CoreV1Api) -> None:
    api.put("configmaps", {"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": "policy", "namespace": "identityd",
                                        "labels": {"openpolicyagent.org/policy": "rego"}},
                           "data": {"main.rego": "package x"}})
    listed = await core.list_namespaced_config_map(
        "identityd", label_selector="openpolicyagent.org/policy=rego")
    assert [cm.metadata.name for cm in listed.items] == ["policy"]
    rv = listed.metadata.resource_version

    status = '{"status":"ok"}'
    patched = await core.patch_namespaced_config_map(
        "policy", "identityd",
        {"metadata": {"annotations": {"openpolicyagent.org/kube-mgmt-status": status}}})
    assert patched.metadata.annotations == {"openpolicyagent.org/kube-mgmt-status": status}
    assert patched.data == {"main.rego": "package x"}
    assert api.requests[-1].headers["Content-Type"] == "application/strategic-merge-patch+json"

    got = await core.read_namespaced_config_map("policy", "identityd")
    assert got.metadata.resource_version == patched.metadata.resource_version != rv

    # A merge patch carrying a stale resourceVersion is a conflict.
    with pytest.raises(ApiException) as conflict:
        await core.patch_namespaced_config_map(
            "policy", "identityd", {"metadata": {"resourceVersion": rv}, "data": {"b": "2"}})
    assert conflict.value.status == 409

    # A JSON patch (a list body).
    await core.patch_namespaced_config_map(
        "policy", "identityd", [{"op": "add", "path": "/data/extra.rego", "value": "package y"}])
    assert api.store.get("configmaps", "identityd", "policy")["data"] == {  # type: ignore[index]
        "main.rego": "package x", "extra.rego": "package y"}

    resp: Any = await core.list_namespaced_config_map(
        "identityd", watch=True, resource_version=rv, _preload_content=False)
    try:
        kinds = [json.loads(await resp.content.readline())["type"] for _ in range(2)]
        assert kinds == ["MODIFIED", "MODIFIED"]
    finally:
        resp.close()

    with pytest.raises(ApiException) as missing:
        await core.patch_namespaced_config_map("nope", "identityd", {"data": {}})
    assert missing.value.status == 404


def test_patch_helpers() -> None:
    assert merge_patch({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": None, "e": 4}}) == {
        "a": 1, "b": {"d": 3, "e": 4}}
    doc = {"data": {"a/b": "1"}, "list": [1, 2]}
    assert json_patch(doc, [{"op": "replace", "path": "/data/a~1b", "value": "2"},
                            {"op": "add", "path": "/list/-", "value": 3},
                            {"op": "remove", "path": "/list/0"}]) == {
        "data": {"a/b": "2"}, "list": [2, 3]}
    with pytest.raises(ValueError, match="test failed"):
        json_patch(doc, [{"op": "test", "path": "/list/0", "value": 9}])
