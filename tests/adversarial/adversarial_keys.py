"""Corpus cases against the key the certificate would carry: keys no honest agent makes,
as ZTS's csrPublicKey alone or inside a CSR (validly self-signed where the key allows
it). Each names a key that policy, judging by type and size, used to allow: an RSA
modulus that is even, a power of 2 or 3, has a small factor or more than 8192 bits; an
EC key with explicit curve parameters or a compressed point; an ambiguous PEM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.adversarial.adversarial_world import Case, Wire, World, case
from tests.keys import broken_keys as bk


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _n2048() -> int:
    return bk.rsa_with_factor_3().n // 3  # two 1024-bit primes


def _pem(key: Any) -> str:
    text: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return text.decode("ascii")


def _weak() -> str:
    return _pem(rsa.generate_private_key(65537, 1024))


def _names(w: World) -> dict[str, Any]:
    ident = w.cluster.identity(w.pods.api)
    return {
        "cn": ident.common_name,
        "dns": tuple(ident.san_dns()),
        "ips": (w.pods.api.ip,),
        "uris": tuple(ident.san_uris()),
    }


def key_abuse() -> Iterator[Case]:
    cat = "key abuse"

    def public_key(name: str, pem: Callable[[], str]) -> Case:
        return case(
            cat,
            f"csrPublicKey alone: {name}",
            400,
            "BAD_CSR_PUBLIC_KEY",
            lambda w: Wire(body=w.confirmation(csr=False, attributes={"csrPublicKey": pem()})),
        )

    def spki(name: str, der: Callable[[], bytes]) -> Case:
        return public_key(name, lambda: bk.public_key_pem(der()))

    yield spki("RSA modulus even", lambda: bk.rsa_spki(_n2048() + 1))
    yield spki("RSA modulus 2^2047", lambda: bk.rsa_spki(1 << 2047))
    yield spki("RSA modulus 3^1293", lambda: bk.rsa_spki(3**1293))
    yield spki("RSA modulus with factor 3", lambda: bk.rsa_with_factor_3().spki())
    yield spki("RSA modulus with factor 997", lambda: bk.rsa_with_factor_997().spki())
    yield spki("RSA modulus of 8193 bits", lambda: bk.rsa_spki(bk.odd_without_small_factors(8193)))
    yield spki(
        "RSA modulus of 20000 bits", lambda: bk.rsa_spki(bk.odd_without_small_factors(20000))
    )
    yield spki("RSA exponent 1", lambda: bk.rsa_spki(_n2048(), 1))
    yield spki("RSA exponent 2", lambda: bk.rsa_spki(_n2048(), 2))
    yield spki("RSA exponent n-1 (even)", lambda: bk.rsa_spki(_n2048(), _n2048() - 1))
    yield spki("RSA exponent of 65 bits", lambda: bk.rsa_spki(_n2048(), (1 << 64) + 1))
    yield spki(
        "RSA algorithm without NULL parameters",
        lambda: bk.rsa_spki(_n2048(), null_parameters=False),
    )
    yield spki("EC explicit P-256 parameters", lambda: bk.ec_explicit_spki(_p256()))
    yield spki("EC compressed point", lambda: bk.ec_compressed_spki(_p256()))
    yield public_key(
        "PKCS#1 RSA PUBLIC KEY with modulus 2^2047",
        lambda: bk.to_pem(bk.seq(bk.der_int(1 << 2047), bk.der_int(65537)), "RSA PUBLIC KEY"),
    )
    yield public_key("two PEM blocks, a weak key second", lambda: _pem(_p256()) + _weak())
    yield public_key("two PEM blocks, a weak key first", lambda: _weak() + _pem(_p256()))
    yield public_key("text after the PEM block", lambda: _pem(_p256()) + "garbage")

    def csr(name: str, pem: Callable[[dict[str, Any]], str]) -> Case:
        # The CSR names exactly what the request does; only its key is wrong.
        return case(
            cat,
            f"CSR: {name}",
            400,
            "BAD_CSR",
            lambda w: Wire(
                body=w.confirmation(public_key=False, attributes={"csr": pem(_names(w))})
            ),
        )

    yield csr(
        "RSA modulus with factor 3, validly signed",
        lambda n: bk.rsa_csr(bk.rsa_with_factor_3(), **n),
    )
    yield csr(
        "RSA modulus with factor 997, validly signed",
        lambda n: bk.rsa_csr(bk.rsa_with_factor_997(), **n),
    )
    yield csr(
        "RSA modulus of ~10240 bits, validly signed",
        lambda n: bk.rsa_csr(bk.rsa_over_8192_bits(), **n),
    )
    yield csr(
        "EC explicit parameters, validly signed", lambda n: bk.ec_csr(bk.ec_explicit_spki, **n)
    )
    yield csr(
        "EC compressed point, validly signed", lambda n: bk.ec_csr(bk.ec_compressed_spki, **n)
    )
    yield csr("RSA modulus even", lambda n: bk.unsigned_rsa_csr(_n2048() * 2, **n))
    yield csr("RSA modulus 2^2047", lambda n: bk.unsigned_rsa_csr(1 << 2047, **n))
    yield csr("RSA modulus 3^1293", lambda n: bk.unsigned_rsa_csr(3**1293, **n))
    yield csr(
        "RSA modulus of 20000 bits",
        lambda n: bk.unsigned_rsa_csr(bk.odd_without_small_factors(20000), **n),
    )

    def explicit_csr_canonical_zts_key(w: World) -> Wire:
        # ZTS states the key in its canonical form; the CSR carries the explicit one.
        key = _p256()
        pem = bk.csr_with_key(
            bk.ec_explicit_spki(key),
            lambda data: key.sign(data, ec.ECDSA(hashes.SHA256())),
            signature_algorithm=bk.ECDSA_WITH_SHA256_ALGORITHM,
            **_names(w),
        )
        return Wire(body=w.confirmation(attributes={"csr": pem, "csrPublicKey": _pem(key)}))

    yield case(
        cat,
        "CSR with explicit EC parameters, csrPublicKey the same key canonically",
        400,
        "BAD_CSR",
        explicit_csr_canonical_zts_key,
    )
