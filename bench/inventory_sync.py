"""Pod inventory benchmark: initial sync of many pods, then watch throughput and lag.

    python bench/inventory_sync.py                       # 100k pods, 2,000 events/s for 10 s
    python bench/inventory_sync.py --pods 20000 --rate 500 --duration 5
    python bench/inventory_sync.py --compare-models      # raw JSON vs the client's models

The API-server double (tests/doubles/kube_apiserver.py) runs in a child process
(spawned, so its memory is its own) holding realistic ~4 KB pods. This process
runs a WatchInventory against it through the real kubernetes_asyncio client and
reports:

- sync: wall time from start to synced, and peak RSS of this process
  (``ru_maxrss``) with the baseline after imports, for the targets
  100k pods <= 150 MB RSS and <= 10 s;
- watch: the double modifies pods at ``--rate`` events/s, stamping each with
  its wall-clock send time in annotation ``identityd.io/bench-sent``; the
  inventory's observer measures event-to-cache lag (write in the double ->
  record in the cache) p50/p99/max, target p99 <= 50 ms at 2,000 events/s;
  then a burst as fast as the double can write, for the throughput ceiling;
- the event loop's stall (how late a 1 ms timer fires) during sync and churn,
  the cost a busy watch puts on decisions served from the same loop.

Both processes share this machine's CPUs; the double's writes cost about as much
as the inventory's reads, so the burst figure is a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SENT = "identityd.io/bench-sent"


# -- the double's process ------------------------------------------------------------------------


def bench_pod(i: int) -> dict[str, Any]:
    """A pod about the size a Deployment's pod has in a real cluster (~4 KB of JSON)."""
    from tests.doubles.kube_apiserver import pod_manifest

    namespace, app = f"team-{i % 200:03d}", f"svc-{i % 2000:04d}"
    pod = pod_manifest(
        namespace, f"{app}-{i:06d}", service_account=app,
        ip=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", node=f"node-{i % 500:03d}",
        labels={"app": app, "pod-template-hash": "7d9f8c6b5", "tier": "backend",
                "app.kubernetes.io/part-of": namespace, "version": "v1"},
        annotations={"prometheus.io/scrape": "true", "prometheus.io/port": "9090",
                     "kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
    )
    meta, spec, status = pod["metadata"], pod["spec"], pod["status"]
    meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                "name": f"{app}-7d9f8c6b5", "uid": "6f1c6c2e-1111-2222-3333-"
                                "444455556666", "controller": True, "blockOwnerDeletion": True}]
    meta["managedFields"] = [
        {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
         "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
         "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {
             f"f:{k}": {} for k in meta["labels"]}, "f:ownerReferences": {}},
             "f:spec": {"f:containers": {"k:{\"name\":\"main\"}": {
                 ".": {}, "f:env": {}, "f:image": {}, "f:imagePullPolicy": {}, "f:name": {},
                 "f:ports": {}, "f:resources": {}, "f:volumeMounts": {}}}}}},
        {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status",
         "time": "2026-01-01T00:00:10Z", "fieldsType": "FieldsV1",
         "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {},
                                   "f:phase": {}, "f:podIP": {}, "f:podIPs": {},
                                   "f:startTime": {}}}},
    ]
    main = spec["containers"][0]
    main["env"] = [{"name": f"SETTING_{n}", "value": f"value-{n}"} for n in range(6)]
    main["volumeMounts"] = [{"name": "kube-api-access", "readOnly": True,
                             "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]
    spec["volumes"] = [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt",
                                                              "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {
            "apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}]
    spec["tolerations"] = [
        {"key": f"node.kubernetes.io/{t}", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 300} for t in ("not-ready", "unreachable")]
    status["conditions"] = [{"type": t, "status": "True", "lastProbeTime": None,
                             "lastTransitionTime": "2026-01-01T00:00:05Z"}
                            for t in ("PodReadyToStartContainers", "Initialized", "Ready",
                                      "ContainersReady", "PodScheduled")]
    status["containerStatuses"] = [{
        "name": "main", "ready": True, "restartCount": 0, "started": True,
        "image": "registry.example/app:1.0", "imageID": "registry.example/app@sha256:" + "ab" * 32,
        "containerID": "containerd://" + "cd" * 32,
        "state": {"running": {"startedAt": "2026-01-01T00:00:06Z"}}, "lastState": {}}]
    return pod


def serve_double(pods: int, conn: multiprocessing.connection.Connection) -> None:
    asyncio.run(_double_main(pods, conn))


async def _double_main(pods: int, conn: multiprocessing.connection.Connection) -> None:
    from tests.doubles.kube_apiserver import KubeAPIServer

    api = KubeAPIServer(history=100_000)
    await api.start()
    for i in range(pods):
        api.store.put("pods", bench_pod(i), owned=True)
    keys = [(f"team-{i % 200:03d}", f"svc-{i % 2000:04d}-{i:06d}") for i in range(pods)]
    # The double's millions of pod dicts never form cycles; without this, its full
    # collections (seconds each) would show up as the inventory's sync time and lag.
    gc.collect()
    gc.freeze()
    conn.send(api.url)
    loop = asyncio.get_running_loop()
    try:
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command[0] == "stop":
                break
            _, rate, seconds = command
            sent = await _churn(api, keys, rate, seconds)
            conn.send(sent)
    finally:
        await api.close()


async def _churn(api: Any, keys: list[tuple[str, str]], rate: float | None,
                 seconds: float) -> int:
    """MODIFY pods, each stamped with its send time: at ``rate``/s (None = flat out)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    while (elapsed := loop.time() - start) < seconds:
        due = int(elapsed * rate) + 1 if rate else sent + 200
        while sent < due:
            namespace, name = keys[sent % len(keys)]
            current = api.store._objects["pods"][(namespace, name)].obj
            meta = {**current["metadata"],
                    "annotations": {**current["metadata"]["annotations"],
                                    SENT: f"{time.time():.6f}"}}
            api.store.put("pods", {**current, "metadata": meta}, owned=True)
            sent += 1
        await asyncio.sleep(0.002 if rate else 0)
    return sent


# -- this process: the inventory -----------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LoopStall:
    """How late a 1 ms timer fires: what a busy watch costs requests on the same loop."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.samples.clear()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return self.samples

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.001)
            self.samples.append(loop.time() - before - 0.001)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, url: str,
              conn: multiprocessing.connection.Connection) -> dict[str, Any]:
    from identityd.inventory.base import PodRecord
    from identityd.inventory.watch import WatchInventory, WatchSettings
    from identityd.kubeapi import KubeConnection

    lags: list[float] = []
    counting = {"events": 0}

    def observe(kind: str, record: PodRecord | None) -> None:
        counting["events"] += 1
        if record is not None and SENT in record.annotations:
            lags.append(time.time() - float(record.annotations[SENT]))

    gc.collect()
    baseline = rss_mb()
    settings = WatchSettings(page_size=args.page_size, resync_seconds=0)
    inventory = WatchInventory(KubeConnection(host=url, token="double-token"), settings,
                               observer=observe)
    stall = LoopStall()
    result: dict[str, Any] = {"pods": args.pods, "baseline_rss_mb": round(baseline, 1)}
    started, cpu = time.perf_counter(), time.process_time()
    stall.start()
    await inventory.start()
    try:
        await inventory.wait_synced()
        result["sync_seconds"] = round(time.perf_counter() - started, 2)
        # CPU of this process alone: steadier than wall time on a shared machine.
        result["sync_cpu_seconds"] = round(time.process_time() - cpu, 2)
        result["sync_loop_stall_p99_ms"] = round(pct(await stall.stop(), 0.99) * 1000, 1)
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        gc.collect()
        result["rss_after_sync_mb"] = round(rss_mb(), 1)
        result["synced_pods"] = inventory.size()

        for label, rate, seconds in (("paced", args.rate, args.duration),
                                     ("burst", None, args.burst)):
            if not seconds:
                continue
            lags.clear()
            counting["events"] = 0
            stall.start()
            t0 = time.perf_counter()
            conn.send(("churn", rate, seconds))
            sent = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            async with asyncio.timeout(60):
                while len(lags) < sent:  # noqa: ASYNC110 - the observer appends
                    await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - t0
            stalls = await stall.stop()
            result[label] = {
                "events": sent, "seconds": round(elapsed, 2),
                "events_per_second": round(sent / elapsed),
                "lag_p50_ms": round(pct(lags, 0.5) * 1000, 1),
                "lag_p99_ms": round(pct(lags, 0.99) * 1000, 1),
                "lag_max_ms": round(max(lags) * 1000, 1),
                "loop_stall_p99_ms": round(pct(stalls, 0.99) * 1000, 1),
            }
        result["peak_rss_mb_end"] = round(peak_rss_mb(), 1)
    finally:
        await inventory.aclose()
    return result


def compare_models(count: int) -> dict[str, Any]:
    """Parse one PodList both ways: raw JSON + RecordBuilder vs the client's models."""
    from types import SimpleNamespace

    from kubernetes_asyncio import client as k8s

    from identityd.inventory.store import RecordBuilder

    body = json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {
        "resourceVersion": "1"}, "items": [bench_pod(i) for i in range(count)]})
    t0 = time.perf_counter()
    build = RecordBuilder()
    records = [build(item) for item in json.loads(body)["items"]]
    raw = time.perf_counter() - t0
    api = k8s.ApiClient.__new__(k8s.ApiClient)  # deserialize() needs no session
    api.configuration = k8s.Configuration()
    t0 = time.perf_counter()
    response: Any = SimpleNamespace(data=body)
    models = api.deserialize(response, "V1PodList")
    model = time.perf_counter() - t0
    return {"pods": count, "bytes_per_pod": len(body) // count,
            "raw_json_us_per_pod": round(raw / count * 1e6, 1),
            "models_us_per_pod": round(model / count * 1e6, 1),
            "models_slower_by": round(model / raw, 1),
            "records": len(records), "model_items": len(models.items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=100_000)
    parser.add_argument("--page-size", type=int, default=500)
    parser.add_argument("--rate", type=float, default=2000.0, help="paced events/s")
    parser.add_argument("--duration", type=float, default=10.0, help="paced seconds (0: skip)")
    parser.add_argument("--burst", type=float, default=5.0, help="flat-out seconds (0: skip)")
    parser.add_argument("--compare-models", action="store_true",
                        help="only compare raw-JSON parsing with the client's models")
    args = parser.parse_args()
    if args.compare_models:
        print(json.dumps(compare_models(2000), indent=2))
        return

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    double = ctx.Process(target=serve_double, args=(args.pods, theirs), daemon=True)
    t0 = time.perf_counter()
    double.start()
    url = ours.recv()
    print(f"double: {args.pods} pods ready in {time.perf_counter() - t0:.1f} s at {url} "
          f"(pid {double.pid}); this process pid {os.getpid()}", file=sys.stderr)
    try:
        result = asyncio.run(run(args, url, ours))
    finally:
        ours.send(("stop",))
        double.join(10)
        if double.is_alive():
            double.terminate()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
