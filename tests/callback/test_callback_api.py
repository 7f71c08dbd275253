"""The callback API over real HTTP: allow, every deny of the issue, and the service
keeps serving after each."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from identityd.devca.workload import DevCluster
from identityd.keys.csr import build_csr, generate_key
from tests.conftest import Pods, Service


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def claims_of(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def forge(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


def codes_of(status: int, message: str) -> set[str]:
    """A 403 lists codes joined by ", "; other errors are "CODE: detail"."""
    if status == 403:
        return set(message.split(", "))
    return {message.split(":", 1)[0]}


async def assert_still_serving(service: Service, cluster: DevCluster, pods: Pods) -> None:
    status, answer = await service.post("instance", cluster.confirmation(pods.api))
    assert status == 200, answer


async def test_legitimate_pod_is_allowed_and_confirmation_echoed(
    service: Service, cluster: DevCluster, pods: Pods
) -> None:
    body = cluster.confirmation(pods.api)
    status, answer = await service.post("instance", body)
    assert status == 200, answer
    assert answer["provider"] == body["provider"] and answer["domain"] == "sports.web"
    assert answer["attributes"]["certExpiryTime"] == str(
        service.settings.identity.cert_expiry_minutes
    )
    assert answer["attributes"]["certRefresh"] == "true"
    assert answer["attributes"]["certUsage"] == "client"
    assert answer["attributes"]["instanceId"] == pods.api.uid


async def test_refresh_and_wrapped_identity_token_are_allowed(
    service: Service, cluster: DevCluster, pods: Pods
) -> None:
    wrapped = json.dumps({"identityToken": cluster.token(pods.api)})
    status, answer = await service.post("refresh", cluster.confirmation(pods.api, token=wrapped))
    assert status == 200, answer
    assert answer["attestationData"] == wrapped


async def test_request_without_csr_is_decided_on_attributes(
    service: Service, cluster: DevCluster, pods: Pods
) -> None:
    status, _ = await service.post("instance", cluster.confirmation(pods.api, csr=False))
    assert status == 200


def _hs256_with_public_key(cluster: DevCluster, pods: Pods) -> str:
    public_pem = cluster.issuer.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = claims_of(cluster.token(pods.api))
    return forge(
        {"alg": "HS256", "typ": "JWT", "kid": cluster.issuer.kid},
        claims,
        lambda data: hmac.new(public_pem, data, hashlib.sha256).digest(),
    )


def _bad_csr_signature(cluster: DevCluster, pods: Pods) -> str:
    ident = cluster.identity(pods.api)
    pem = build_csr(
        generate_key("EC"),
        cn=ident.common_name,
        dns=ident.san_dns(),
        ips=[pods.api.ip],
        uris=ident.san_uris(),
    )
    lines = pem.strip().splitlines()
    der = bytearray(base64.b64decode("".join(lines[1:-1])))
    der[-5] ^= 0xFF  # inside the signature BIT STRING
    body = base64.encodebytes(bytes(der)).decode()
    return f"{lines[0]}\n{body}{lines[-1]}\n"


def _weak_rsa_csr(cluster: DevCluster, pods: Pods) -> str:
    ident = cluster.identity(pods.api)
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return build_csr(
        key, cn=ident.common_name, dns=ident.san_dns(), ips=[pods.api.ip], uris=ident.san_uris()
    )


def _cases(cluster: DevCluster, pods: Pods) -> list[tuple[str, Any, int, str]]:
    now = time.time()
    ident = cluster.identity(pods.api)
    other_issuer = DevCluster()
    unsigned_claims = claims_of(cluster.token(pods.api))
    return [
        ("non-JSON", b"{not json", 400, "BAD_JSON"),
        (
            "wrong types",
            {"provider": 1, "domain": [], "service": {}, "attestationData": 2},
            400,
            "BAD_REQUEST",
        ),
        ("missing fields", {"provider": cluster.provider}, 400, "BAD_REQUEST"),
        (
            "unknown provider",
            cluster.confirmation(pods.api, provider="sys.auth.other"),
            403,
            "PROVIDER_MISMATCH",
        ),
        ("broken JWT", cluster.confirmation(pods.api, token="abc.%%%.def"), 403, "TOKEN_MALFORMED"),
        ("not a JWT", cluster.confirmation(pods.api, token="hello"), 403, "TOKEN_MALFORMED"),
        (
            "alg none",
            cluster.confirmation(pods.api, token=forge({"alg": "none"}, unsigned_claims)),
            403,
            "TOKEN_ALG_NOT_ALLOWED",
        ),
        (
            "HS256 with the public key",
            cluster.confirmation(pods.api, token=_hs256_with_public_key(cluster, pods)),
            403,
            "TOKEN_ALG_NOT_ALLOWED",
        ),
        (
            "unknown kid",
            cluster.confirmation(pods.api, token=other_issuer.token(pods.api)),
            403,
            "TOKEN_UNKNOWN_KID",
        ),
        (
            "wrong issuer",
            cluster.confirmation(
                pods.api, token=cluster.token(pods.api, claims_override={"iss": "https://evil"})
            ),
            403,
            "TOKEN_ISSUER_MISMATCH",
        ),
        (
            "wrong audience",
            cluster.confirmation(pods.api, token=cluster.token(pods.api, audiences=["vault"])),
            403,
            "TOKEN_AUDIENCE_MISMATCH",
        ),
        (
            "expired",
            cluster.confirmation(pods.api, token=cluster.token(pods.api, now=now - 7200)),
            403,
            "TOKEN_EXPIRED",
        ),
        (
            "not yet valid",
            cluster.confirmation(pods.api, token=cluster.token(pods.api, now=now + 600)),
            403,
            "TOKEN_NOT_YET_VALID",
        ),
        ("deleted pod", cluster.confirmation(pods.gone), 403, "POD_NOT_FOUND"),
        (
            "recycled pod name",
            cluster.confirmation(
                pods.api,
                token=cluster.issuer.mint(
                    "sports-web",
                    "api",
                    pods.api.name,
                    "0badc0de-old-uid",
                    audiences=["identityd"],
                    node_name="node-1",
                ),
                attributes={"instanceId": "0badc0de-old-uid"},
            ),
            403,
            "POD_UID_MISMATCH",
        ),
        ("terminating pod", cluster.confirmation(pods.terminating), 403, "POD_TERMINATING"),
        ("pending pod", cluster.confirmation(pods.pending), 403, "POD_NOT_RUNNING"),
        (
            "SAN DNS outside the suffix",
            cluster.confirmation(pods.api, san_dns=[ident.service_dns, "api.sports-web.evil.com"]),
            403,
            "SAN_DNS_NOT_ALLOWED",
        ),
        (
            "wildcard for another service",
            cluster.confirmation(pods.api, san_dns=[f"*.billing.payments.{cluster.dns_suffix}"]),
            403,
            "SAN_DNS_NOT_ALLOWED",
        ),
        (
            "SAN IP of another pod",
            cluster.confirmation(pods.api, san_ip=[pods.other.ip]),
            403,
            "SAN_IP_NOT_ALLOWED",
        ),
        (
            "instance-id URI of another pod",
            cluster.confirmation(
                pods.api,
                san_uri=[
                    ident.athenz_spiffe_uri,
                    f"athenz://instanceid/{cluster.provider}/{pods.other.uid}",
                ],
            ),
            403,
            "SAN_URI_NOT_ALLOWED",
        ),
        (
            "CSR signature does not verify",
            cluster.confirmation(pods.api, attributes={"csr": _bad_csr_signature(cluster, pods)}),
            403,
            "CSR_SIGNATURE_INVALID",
        ),
        (
            "CSR with an RSA-1024 key",
            cluster.confirmation(pods.api, attributes={"csr": _weak_rsa_csr(cluster, pods)}),
            403,
            "CSR_KEY_WEAK",
        ),
        (
            "CSR that is not a CSR",
            cluster.confirmation(
                pods.api,
                attributes={
                    "csr": "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n"
                    "-----END CERTIFICATE REQUEST-----\n"
                },
            ),
            400,
            "BAD_CSR",
        ),
    ]


@pytest.mark.parametrize("index", range(24))
async def test_bad_input_gets_its_status_and_code_and_service_keeps_serving(
    service: Service, cluster: DevCluster, pods: Pods, index: int
) -> None:
    title, body, status, code = _cases(cluster, pods)[index]
    got_status, answer = await service.post("instance", body)
    assert (got_status, answer["code"]) == (status, status), (title, answer)
    assert code in codes_of(got_status, answer["message"]), (title, answer)
    await assert_still_serving(service, cluster, pods)


def test_the_case_table_is_fully_parametrized(cluster: DevCluster, pods: Pods) -> None:
    assert len(_cases(cluster, pods)) == 24


async def test_oversized_body_is_413(service: Service, cluster: DevCluster, pods: Pods) -> None:
    big = json.dumps({"x": "a" * (service.settings.max_body_bytes + 10)})
    status, answer = await service.post("instance", big)
    assert status == 413
    assert answer["message"].startswith("BODY_TOO_LARGE")
    await assert_still_serving(service, cluster, pods)


async def test_chunked_oversized_body_is_413(
    service: Service, cluster: DevCluster, pods: Pods
) -> None:
    async def chunks() -> Any:
        for _ in range(100):
            yield b"a" * 4096

    status, answer = await service.post("instance", chunks())
    assert status == 413, answer
    await assert_still_serving(service, cluster, pods)


async def test_wrong_content_type_is_400(service: Service) -> None:
    async with service.http.post(
        f"{service.url}/instance", data=b"{}", headers={"Content-Type": "text/plain"}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["message"].startswith("BAD_CONTENT_TYPE")


async def test_deny_message_carries_codes_not_details(
    service: Service, cluster: DevCluster, pods: Pods
) -> None:
    status, answer = await service.post(
        "instance", cluster.confirmation(pods.api, san_ip=[pods.other.ip])
    )
    assert status == 403
    assert pods.other.ip not in answer["message"]


async def test_decision_log_has_reasons_and_no_secrets(
    service: Service, cluster: DevCluster, pods: Pods, caplog: pytest.LogCaptureFixture
) -> None:
    body = cluster.confirmation(pods.api, san_ip=[pods.other.ip])
    with caplog.at_level(logging.INFO, logger="identityd.decision"):
        status, _ = await service.post("instance", body, headers={"X-Request-Id": "req-42"})
    assert status == 403
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "identityd.decision"]
    assert len(records) == 1
    rec = records[0]
    assert rec["request_id"] == "req-42" and rec["decision"] == "deny"
    assert any(r.startswith("SAN_IP_NOT_ALLOWED") for r in rec["reasons"])
    assert rec["instance_id"] == pods.api.uid and rec["token_pod"] == "sports-web/api-1"
    text = caplog.text
    assert body["attestationData"] not in text
    assert body["attestationData"].split(".")[2] not in text
    assert "CERTIFICATE REQUEST" not in text and body["attributes"]["csr"][40:120] not in text


async def test_health_ready_and_metrics(service: Service, cluster: DevCluster, pods: Pods) -> None:
    assert (await service.get("/healthz"))[0] == 200
    # Ready once the key file is read, in the background at start-up (a few ms).
    for _ in range(100):
        if (await service.get("/readyz"))[0] == 200:
            break
        await asyncio.sleep(0.02)
    assert (await service.get("/readyz"))[0] == 200
    await service.post("instance", cluster.confirmation(pods.api))
    await service.post("instance", cluster.confirmation(pods.gone))
    status, text = await service.get("/metrics")
    assert status == 200
    assert 'identityd_decisions_total{kind="instance",result="allow"} 1.0' in text
    assert 'identityd_decisions_total{kind="instance",result="deny"} 1.0' in text
    assert 'identityd_decision_reasons_total{code="POD_NOT_FOUND"} 1.0' in text
    assert "identityd_inventory_pods 5.0" in text
    assert 'identityd_stage_seconds_count{stage="policy"}' in text


async def test_unknown_route_and_method_are_json_errors(service: Service) -> None:
    async with service.http.get(f"{service.url}/instance") as resp:
        assert resp.status == 405
        assert (await resp.json())["code"] == 405
    async with service.http.get(f"{service.url}/nope") as resp:
        assert resp.status == 404


async def test_slow_body_is_cut_off_and_service_keeps_serving(
    service: Service, cluster: DevCluster, pods: Pods, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import identityd.callback.http as http_module

    monkeypatch.setattr(http_module, "BODY_READ_TIMEOUT_SECONDS", 0.3)
    port = int(service.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /instance HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"provider":'
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400")
    await assert_still_serving(service, cluster, pods)


def _public_key_pem(key: object) -> str:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    assert isinstance(key, PrivateKeyTypes.__args__)  # type: ignore[attr-defined]
    return (
        key.public_key()
        .public_bytes(  # type: ignore[union-attr]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        .decode()
    )


async def test_csr_public_key_attribute_must_match_the_csr(
    service: Service, cluster: DevCluster, pods: Pods
) -> None:
    key, other = generate_key("EC"), generate_key("EC")
    good = cluster.confirmation(
        pods.api, key=key, attributes={"csrPublicKey": _public_key_pem(key)}
    )
    status, answer = await service.post("instance", good)
    assert status == 200, answer
    bad = cluster.confirmation(
        pods.api, key=key, attributes={"csrPublicKey": _public_key_pem(other)}
    )
    status, answer = await service.post("instance", bad)
    assert (status, answer["message"]) == (403, "CSR_PUBLIC_KEY_MISMATCH")
    junk = cluster.confirmation(pods.api, key=key, attributes={"csrPublicKey": "-----BEGIN x\n"})
    status, answer = await service.post("instance", junk)
    assert status == 400
    assert answer["message"].startswith("BAD_CSR_PUBLIC_KEY")
