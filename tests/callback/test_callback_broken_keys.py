"""Over real HTTP: a broken or non-canonically encoded key is a 400 whichever way it comes
(csrPublicKey alone, as ZTS usually sends it, or inside a validly signed CSR), on
/instance and /refresh. Each of these used to be allowed: the policy saw an RSA key of
2048+ bits or a P-256 key and had nothing to object to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from identityd.devca.workload import DevCluster
from tests.conftest import Pods, Service
from tests.keys import broken_keys as bk


def _n2048() -> int:
    return bk.rsa_with_factor_3().n // 3


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


PUBLIC_KEYS = [
    pytest.param(lambda: bk.rsa_spki(_n2048() + 1), id="even-modulus"),
    pytest.param(lambda: bk.rsa_spki(1 << 2047), id="modulus-power-of-2"),
    pytest.param(lambda: bk.rsa_spki(3**1293), id="modulus-power-of-3"),
    pytest.param(lambda: bk.rsa_with_factor_3().spki(), id="modulus-with-factor-3"),
    pytest.param(lambda: bk.rsa_spki(bk.odd_without_small_factors(20000)), id="20000-bit-modulus"),
    pytest.param(lambda: bk.ec_explicit_spki(_p256()), id="EC-explicit-parameters"),
]


@pytest.mark.parametrize("path", ["instance", "refresh"])
@pytest.mark.parametrize("spki", PUBLIC_KEYS)
async def test_broken_csr_public_key_alone_is_a_bad_request(
    service: Service, cluster: DevCluster, pods: Pods, spki: Callable[[], bytes], path: str
) -> None:
    body = cluster.confirmation(
        pods.api, csr=False, attributes={"csrPublicKey": bk.public_key_pem(spki())}
    )
    status, answer = await service.post(path, body)
    assert status == 400, answer
    assert answer["message"].startswith("BAD_CSR_PUBLIC_KEY: ")


def _names(cluster: DevCluster, pods: Pods) -> dict[str, Any]:
    ident = cluster.identity(pods.api)
    return {
        "cn": ident.common_name,
        "dns": tuple(ident.san_dns()),
        "ips": (pods.api.ip,),
        "uris": tuple(ident.san_uris()),
    }


CSRS = [
    pytest.param(lambda names: bk.rsa_csr(bk.rsa_with_factor_3(), **names), id="factor-3"),
    pytest.param(lambda names: bk.rsa_csr(bk.rsa_over_8192_bits(), **names), id="over-8192-bits"),
    pytest.param(lambda names: bk.ec_csr(bk.ec_explicit_spki, **names), id="EC-explicit"),
    pytest.param(lambda names: bk.unsigned_rsa_csr(1 << 2047, **names), id="power-of-2"),
]


@pytest.mark.parametrize("path", ["instance", "refresh"])
@pytest.mark.parametrize("make", CSRS)
async def test_csr_with_a_broken_key_is_a_bad_request(
    service: Service,
    cluster: DevCluster,
    pods: Pods,
    make: Callable[[dict[str, Any]], str],
    path: str,
) -> None:
    # The CSR names exactly what the request does; only its key is wrong. No
    # csrPublicKey: the CSR's key alone must be judged.
    body = cluster.confirmation(
        pods.api, public_key=False, attributes={"csr": make(_names(cluster, pods))}
    )
    status, answer = await service.post(path, body)
    assert status == 400, answer
    assert answer["message"].startswith("BAD_CSR: ")


async def test_the_honest_request_next_to_them_is_allowed(
    service: Service, cluster: DevCluster, pods: Pods
) -> None:
    """The control: the same request shapes with an honest key are allowed."""
    for body in (
        cluster.confirmation(pods.api),
        cluster.confirmation(pods.api, csr=False),
        cluster.confirmation(pods.api, public_key=False),
    ):
        status, answer = await service.post("instance", body)
        assert status == 200, answer
