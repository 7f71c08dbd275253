"""The key the certificate will carry is judged whichever way it reaches identityd: from the
CSR, or from csrPublicKey alone, as ZTS usually sends it (real HTTP, real keys)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from identityd.callback.policy_input import key_section
from identityd.devca.workload import DevCluster
from identityd.keys import KeyInfo, build_csr, generate_key, parse_csr, parse_public_key
from tests.conftest import Pods, Service


def public_pem(key: Any) -> str:
    text: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return text.decode("ascii")


def only_public_key(cluster: DevCluster, pods: Pods, key: Any) -> dict[str, Any]:
    """What ZTS sends by default: csrPublicKey and no CSR."""
    return cluster.confirmation(pods.api, csr=False, attributes={"csrPublicKey": public_pem(key)})


def codes(message: str) -> set[str]:
    return {reason.split(":", 1)[0] for reason in message.split(", ")}


@pytest.mark.parametrize(
    ("make", "code"),
    [
        pytest.param(lambda: rsa.generate_private_key(65537, 1024), "CSR_KEY_WEAK", id="RSA-1024"),
        pytest.param(
            lambda: ec.generate_private_key(ec.SECP256K1()), "CSR_KEY_WEAK", id="secp256k1"
        ),
        pytest.param(lambda: ec.generate_private_key(ec.SECP192R1()), "CSR_KEY_WEAK", id="P-192"),
        pytest.param(ed25519.Ed25519PrivateKey.generate, "CSR_KEY_TYPE_NOT_ALLOWED", id="Ed25519"),
    ],
)
async def test_csr_public_key_alone_is_judged(
    service: Service, cluster: DevCluster, pods: Pods, make: Any, code: str
) -> None:
    status, answer = await service.post("instance", only_public_key(cluster, pods, make()))
    assert status == 403, answer
    assert codes(answer["message"]) == {code}
    # A refresh is the same request again: no way around the check there.
    status, answer = await service.post("refresh", only_public_key(cluster, pods, make()))
    assert status == 403, answer
    assert codes(answer["message"]) == {code}


@pytest.mark.parametrize("kind", ["EC", "EC384", "RSA"])
async def test_allowed_csr_public_key_alone_is_allowed(
    service: Service, cluster: DevCluster, pods: Pods, kind: str
) -> None:
    status, answer = await service.post(
        "instance", only_public_key(cluster, pods, generate_key(kind))
    )
    assert status == 200, answer


async def test_weak_key_in_csr_and_csr_public_key_is_denied(
    service: Service, cluster: DevCluster, pods: Pods
) -> None:
    key = rsa.generate_private_key(65537, 1024)
    body = cluster.confirmation(pods.api, key=key, attributes={"csrPublicKey": public_pem(key)})
    status, answer = await service.post("instance", body)
    assert (status, codes(answer["message"])) == (403, {"CSR_KEY_WEAK"})


async def test_malformed_csr_public_key_without_csr_is_a_bad_request(
    service: Service, cluster: DevCluster, pods: Pods
) -> None:
    body = cluster.confirmation(pods.api, csr=False, attributes={"csrPublicKey": "-----BEGIN x\n"})
    status, answer = await service.post("instance", body)
    assert status == 400
    assert answer["message"].startswith("BAD_CSR_PUBLIC_KEY")


async def test_request_with_no_key_at_all_is_still_decided_on_the_rest(
    service: Service, cluster: DevCluster, pods: Pods
) -> None:
    # ZTS always sends csrPublicKey (or a CSR) for a certificate; without either there is
    # no key to judge, and the decision is as before input.key existed.
    status, answer = await service.post("instance", cluster.confirmation(pods.api, csr=False))
    assert status == 200, answer


async def test_decision_log_names_the_csr_public_key(
    service: Service, cluster: DevCluster, pods: Pods, caplog: pytest.LogCaptureFixture
) -> None:
    key = generate_key("EC")
    with caplog.at_level(logging.INFO, logger="identityd.decision"):
        status, _ = await service.post("instance", only_public_key(cluster, pods, key))
    assert status == 200
    [record] = [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "identityd.decision"
    ]
    assert record["csr_key_sha256"] == parse_public_key(public_pem(key)).public_key_sha256


# --- the input section itself (pure) ------------------------------------------------------


def test_key_section_prefers_the_csr_and_falls_back_to_csr_public_key() -> None:
    key = generate_key("EC")
    csr = parse_csr(build_csr(key, cn="sports.web.api"))
    zts = parse_public_key(public_pem(generate_key("RSA")))
    assert key_section(csr, zts) == KeyInfo.of_csr(csr).as_input()
    assert key_section(csr, None) == {
        "source": "csr",
        "key_type": "EC",
        "key_bits": 256,
        "curve": "secp256r1",
        "public_key_sha256": csr.public_key_sha256,
    }
    assert key_section(None, zts) == {
        "source": "csrPublicKey",
        "key_type": "RSA",
        "key_bits": 2048,
        "curve": "",
        "public_key_sha256": zts.public_key_sha256,
    }
    assert key_section(None, None) is None
