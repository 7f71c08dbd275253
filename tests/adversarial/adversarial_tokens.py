"""Corpus cases against the attestation token: forged, tampered or abused tokens.

Token forgery uses keys the attacker has (its own, or the cluster's public key
as an HMAC secret) and headers identityd must ignore or refuse; claim abuse
uses tokens carrying the cluster's genuine signature whose claims are wrong.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from identityd.devca.workload import DevPod
from identityd.settings import MAX_TOKEN_BYTES
from tests.adversarial.adversarial_world import (
    MAX_TOKEN_AGE_SECONDS,
    Case,
    Wire,
    World,
    b64,
    b64json,
    bound,
    case,
    decode_segment,
    hmac_signer,
    jwk_thumbprint,
    jws,
    public_der,
    public_jwk,
    public_pem,
    self_signed_der,
    signer,
)

# --- token forgery ---------------------------------------------------------------------


def _with_token(make: Callable[[World], str], path: str = "/instance") -> Callable[[World], Wire]:
    return lambda w: Wire(path=path, body=w.confirmation(token=make(w)))


def _genuine_parts(w: World) -> list[str]:
    return w.token(w.pods.api).split(".")


def _flip_last_char(segment: str) -> str:
    # A 256-byte RS256 signature leaves 4 spare bits in its last base64url char, so
    # only A, Q, g and w are canonical there: stay canonical, change the signature.
    last = segment[-1]
    return segment[:-1] + ("A" if last != "A" else "Q")


def _hmac_token(w: World, choice: tuple[str, Callable[[World], bytes]]) -> str:
    alg, secret = choice
    return jws({"alg": alg, "kid": w.kid}, w.claims(), hmac_signer(secret(w), alg))


def token_forgery() -> Iterator[Case]:
    cat = "token forgery"

    def deny(
        name: str, code: str, make: Callable[[World], str], status: int = 403, gap: str = ""
    ) -> Case:
        return case(cat, name, status, code, _with_token(make), gap)

    # Another key. Same kid: the signature fails; another kid: the kid is unknown;
    # an EC key under the cluster's RSA kid: the key does not fit the alg.
    yield deny(
        "attacker RSA key under the cluster's kid",
        "TOKEN_SIGNATURE_INVALID",
        lambda w: w.attackers.same_kid.mint(
            "sports-web",
            "api",
            w.pods.api.name,
            w.pods.api.uid,
            audiences=["identityd"],
            node_name="node-1",
        ),
    )
    yield deny(
        "attacker RSA key with its own kid",
        "TOKEN_UNKNOWN_KID",
        lambda w: w.attackers.rsa.mint(
            "sports-web", "api", w.pods.api.name, w.pods.api.uid, audiences=["identityd"]
        ),
    )
    yield deny(
        "attacker EC key with its own kid",
        "TOKEN_UNKNOWN_KID",
        lambda w: w.attackers.ec.mint(
            "sports-web", "api", w.pods.api.name, w.pods.api.uid, audiences=["identityd"]
        ),
    )
    yield deny(
        "attacker EC key under the cluster's RSA kid",
        "TOKEN_ALG_NOT_ALLOWED",
        lambda w: jws(
            {"alg": "ES256", "kid": w.kid}, w.claims(), signer(w.attackers.ec.private_key, "ES256")
        ),
    )
    yield deny(
        "attacker RSA key without a kid",
        "TOKEN_SIGNATURE_INVALID",
        lambda w: jws({"alg": "RS256"}, w.claims(), signer(w.attackers.rsa.private_key, "RS256")),
    )
    yield deny(
        "PS256 under the cluster's RS256 key",
        "TOKEN_ALG_NOT_ALLOWED",
        lambda w: jws(
            {"alg": "PS256", "kid": w.kid},
            w.claims(),
            signer(w.attackers.same_kid.private_key, "PS256"),
        ),
    )

    # alg none, in every casing, with and without a signature and a kid.
    for alg in ("none", "None", "NONE", "nOnE"):
        yield deny(
            f"alg {alg!r} without a signature",
            "TOKEN_ALG_NOT_ALLOWED",
            bound(alg, lambda w, alg: jws({"alg": alg, "kid": w.kid}, w.claims())),
        )
    yield deny(
        "alg 'none' with the genuine signature kept",
        "TOKEN_ALG_NOT_ALLOWED",
        lambda w: jws({"alg": "none"}, w.claims()) + _genuine_parts(w)[2],
    )
    yield deny(
        "alg 'none' without a kid",
        "TOKEN_ALG_NOT_ALLOWED",
        lambda w: jws({"alg": "none", "typ": "JWT"}, w.claims()),
    )
    for label, alg_value in (
        ("missing", None),
        ("empty", ""),
        ("lower-case rs256", "rs256"),
        ("with a trailing space", "RS256 "),
        ("a list", ["RS256"]),
        ("a number", 256),
        ("ES512", "ES512"),
        ("EdDSA", "EdDSA"),
        ("PS512", "PS512"),
    ):
        yield deny(
            f"alg {label}",
            "TOKEN_ALG_NOT_ALLOWED",
            bound(
                alg_value,
                lambda w, v: jws(
                    {"kid": w.kid} if v is None else {"alg": v, "kid": w.kid},
                    w.claims(),
                    signer(w.attackers.same_kid.private_key, "RS256"),
                ),
            ),
        )
    yield deny(
        "duplicate alg: RS256 then none",
        "TOKEN_ALG_NOT_ALLOWED",
        lambda w: jws(f'{{"alg":"RS256","kid":"{w.kid}","alg":"none"}}', w.claims()),
    )

    # HMAC with what the attacker knows of the public key as the secret.
    secrets: dict[str, Callable[[World], bytes]] = {
        "SPKI PEM": lambda w: public_pem(w.signing_key),
        "PKCS#1 PEM": lambda w: public_pem(w.signing_key, pkcs1=True),
        "JWK JSON": lambda w: json.dumps(public_jwk(w.cluster.issuer)).encode(),
        "SPKI DER": lambda w: public_der(w.signing_key),
    }
    for alg in ("HS256", "HS384", "HS512"):
        for label, secret in secrets.items():
            yield deny(
                f"{alg} keyed with the public key as {label}",
                "TOKEN_ALG_NOT_ALLOWED",
                bound((alg, secret), _hmac_token),
            )
    yield deny(
        "HS256 with an empty secret and no kid",
        "TOKEN_ALG_NOT_ALLOWED",
        lambda w: jws({"alg": "HS256"}, w.claims(), hmac_signer(b"", "HS256")),
    )

    # kid injection: kid is a dictionary key, nothing else.
    injected = {
        "path traversal": "../../etc/passwd",
        "absolute path": "/dev/null",
        "SQL": "' OR '1'='1' --",
        "SQL stacked": "x'; DROP TABLE keys; --",
        "JNDI": "${jndi:ldap://127.0.0.1:1/a}",
        "format string": "%s%s%s%n",
        "glob": "*",
        "NUL byte": "\u0000",
        "cluster kid plus NUL": None,  # filled in below from the world
        "2 KiB": "k" * 2048,
        "URL": "http://127.0.0.1:1/jwks.json",
    }
    for label, kid in injected.items():
        yield deny(
            f"kid injection ({label}), attacker-signed",
            "TOKEN_UNKNOWN_KID",
            bound(
                kid,
                lambda w, kid: jws(
                    {"alg": "RS256", "kid": kid if kid is not None else w.kid + "\u0000"},
                    w.claims(),
                    signer(w.attackers.rsa.private_key, "RS256"),
                ),
            ),
        )
    for label in ("path traversal", "SQL", "NUL byte"):
        yield deny(
            f"kid injection ({label}), signed by the cluster key",
            "TOKEN_UNKNOWN_KID",
            bound(injected[label], lambda w, kid: w.token(w.pods.api, extra_headers={"kid": kid})),
        )
    yield deny(
        "kid so long the token exceeds the size limit",
        "TOKEN_MALFORMED",
        lambda w: jws(
            {"alg": "RS256", "kid": "k" * (MAX_TOKEN_BYTES + 1)},
            w.claims(),
            signer(w.attackers.rsa.private_key, "RS256"),
        ),
    )
    for label, kid_value in (("a number", 7), ("an object", {"x": 1}), ("null", None)):
        yield deny(
            f"kid that is {label}",
            "TOKEN_HEADER_INVALID",
            bound(
                kid_value,
                lambda w, v: jws(
                    {"alg": "RS256", "kid": v},
                    w.claims(),
                    signer(w.attackers.rsa.private_key, "RS256"),
                ),
            ),
        )

    # Key-carrying headers are ignored: an embedded or referenced attacker key
    # never verifies anything.
    def attacker_rsa_token(headers: Callable[[World], dict[str, Any]]) -> Callable[[World], str]:
        return lambda w: jws(
            {"alg": "RS256", **headers(w)}, w.claims(), signer(w.attackers.rsa.private_key, "RS256")
        )

    def embedded(kid: str) -> Callable[[World], dict[str, Any]]:
        def headers(w: World) -> dict[str, Any]:
            named = {"cluster": w.kid, "attacker": jwk_thumbprint(w.attackers.rsa)}.get(kid)
            return {"jwk": public_jwk(w.attackers.rsa), **({"kid": named} if named else {})}

        return headers

    yield deny(
        "jwk header with the attacker's key and kid",
        "TOKEN_UNKNOWN_KID",
        attacker_rsa_token(embedded("attacker")),
    )
    yield deny(
        "jwk header under the cluster's kid",
        "TOKEN_SIGNATURE_INVALID",
        attacker_rsa_token(embedded("cluster")),
    )
    yield deny(
        "jwk header without a kid", "TOKEN_SIGNATURE_INVALID", attacker_rsa_token(embedded("none"))
    )
    yield deny(
        "jku header pointing at an attacker JWKS",
        "TOKEN_UNKNOWN_KID",
        attacker_rsa_token(
            lambda w: {
                "jku": "http://127.0.0.1:1/jwks.json",
                "kid": jwk_thumbprint(w.attackers.rsa),
            }
        ),
    )
    yield deny(
        "jku header under the cluster's kid",
        "TOKEN_SIGNATURE_INVALID",
        attacker_rsa_token(lambda w: {"jku": "https://evil.example/jwks.json", "kid": w.kid}),
    )
    yield deny(
        "x5u header under the cluster's kid",
        "TOKEN_SIGNATURE_INVALID",
        attacker_rsa_token(lambda w: {"x5u": "https://evil.example/cert.pem", "kid": w.kid}),
    )
    yield deny(
        "x5c header with the attacker's certificate",
        "TOKEN_SIGNATURE_INVALID",
        attacker_rsa_token(
            lambda w: {
                "x5c": [base64.b64encode(self_signed_der(w.attackers.rsa.private_key)).decode()],
                "kid": w.kid,
            }
        ),
    )
    yield deny(
        "x5c header without a kid",
        "TOKEN_SIGNATURE_INVALID",
        attacker_rsa_token(
            lambda w: {
                "x5c": [base64.b64encode(self_signed_der(w.attackers.rsa.private_key)).decode()]
            }
        ),
    )
    yield deny(
        "x5t#S256 header under the cluster's kid",
        "TOKEN_SIGNATURE_INVALID",
        attacker_rsa_token(lambda w: {"x5t#S256": b64(b"\x00" * 32), "kid": w.kid}),
    )
    yield deny(
        "jku, x5u, x5c and jwk all at once",
        "TOKEN_SIGNATURE_INVALID",
        attacker_rsa_token(
            lambda w: {
                "jku": "https://evil.example/jwks.json",
                "x5u": "https://evil.example/cert.pem",
                "x5c": [base64.b64encode(self_signed_der(w.attackers.rsa.private_key)).decode()],
                "jwk": public_jwk(w.attackers.rsa),
                "kid": w.kid,
            }
        ),
    )

    # crit and b64: refused even under the cluster's own valid signature.

    def cluster_signed(headers: dict[str, Any]) -> Callable[[World], str]:
        return lambda w: jws(
            {"alg": "RS256", "kid": w.kid, **headers}, w.claims(), signer(w.signing_key, "RS256")
        )

    for label, headers in (
        ("crit naming exp", {"crit": ["exp"], "exp": 1}),
        ("crit naming an unknown extension", {"crit": ["urn:example:x"], "urn:example:x": 1}),
        ("crit empty", {"crit": []}),
        ("crit not a list", {"crit": "exp"}),
        ("b64=false with crit", {"b64": False, "crit": ["b64"]}),
        ("b64=false without crit", {"b64": False}),
        ("b64=true", {"b64": True}),
    ):
        yield deny(
            f"cluster-signed token with {label}",
            "TOKEN_HEADER_INVALID",
            cluster_signed(headers),
        )

    # Signatures stripped, swapped, damaged.
    yield deny(
        "signature stripped (empty third segment)",
        "TOKEN_SIGNATURE_INVALID",
        lambda w: ".".join(_genuine_parts(w)[:2]) + ".",
    )
    yield deny(
        "signature segment removed", "TOKEN_MALFORMED", lambda w: ".".join(_genuine_parts(w)[:2])
    )
    yield deny(
        "payload of another pod under this token's signature",
        "TOKEN_SIGNATURE_INVALID",
        lambda w: ".".join(
            [_genuine_parts(w)[0], w.token(w.pods.billing).split(".")[1], _genuine_parts(w)[2]]
        ),
    )
    yield deny(
        "this payload under another token's signature",
        "TOKEN_SIGNATURE_INVALID",
        lambda w: ".".join([*_genuine_parts(w)[:2], w.token(w.pods.other).split(".")[2]]),
    )

    def edited_payload(w: World) -> str:
        head, payload, sig = _genuine_parts(w)
        claims = decode_segment(payload)
        claims["kubernetes.io"]["namespace"] = "payments"
        claims["sub"] = "system:serviceaccount:payments:api"
        return f"{head}.{b64json(claims)}.{sig}"

    yield deny(
        "payload edited under the original signature", "TOKEN_SIGNATURE_INVALID", edited_payload
    )

    def reencoded_payload(w: World) -> str:
        head, payload, sig = _genuine_parts(w)
        return f"{head}.{b64(json.dumps(decode_segment(payload), indent=1).encode())}.{sig}"

    yield deny(
        "payload re-encoded with the same claims", "TOKEN_SIGNATURE_INVALID", reencoded_payload
    )

    def header_alg_swapped(w: World) -> str:
        _, payload, sig = _genuine_parts(w)
        return f"{b64json({'alg': 'RS512', 'kid': w.kid})}.{payload}.{sig}"

    yield deny(
        "header alg changed to RS512, signature kept", "TOKEN_ALG_NOT_ALLOWED", header_alg_swapped
    )
    yield deny(
        "signature with its last character changed",
        "TOKEN_SIGNATURE_INVALID",
        lambda w: ".".join([*_genuine_parts(w)[:2], _flip_last_char(_genuine_parts(w)[2])]),
    )
    yield deny(
        "signature truncated",
        "TOKEN_SIGNATURE_INVALID",
        lambda w: ".".join([*_genuine_parts(w)[:2], _genuine_parts(w)[2][:40]]),
    )
    yield deny(
        "signature with base64 padding", "TOKEN_MALFORMED", lambda w: w.token(w.pods.api) + "=="
    )
    yield deny(
        "token followed by a fourth segment",
        "TOKEN_MALFORMED",
        lambda w: w.token(w.pods.api) + ".e30",
    )
    yield deny(
        "JWE-shaped five segments", "TOKEN_MALFORMED", lambda w: "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d"
    )
    yield deny(
        "two tokens joined", "TOKEN_MALFORMED", lambda w: w.token(w.pods.api) + w.token(w.pods.api)
    )
    yield deny(
        "space inside the token",
        "TOKEN_MALFORMED",
        lambda w: w.token(w.pods.api).replace(".", ". ", 1),
    )
    yield deny(
        "full-width dot separators",
        "TOKEN_MALFORMED",
        lambda w: w.token(w.pods.api).replace(".", "\uff0e"),
    )
    yield deny(
        "header that is not JSON",
        "TOKEN_MALFORMED",
        lambda w: b64(b"not json") + "." + ".".join(_genuine_parts(w)[1:]),
    )
    yield deny(
        "header that is a JSON array",
        "TOKEN_MALFORMED",
        lambda w: b64(b'["RS256"]') + "." + ".".join(_genuine_parts(w)[1:]),
    )
    yield deny("not a JWT at all", "TOKEN_MALFORMED", lambda w: "hello")
    yield case(
        cat,
        "attestationData larger than twice the token limit",
        400,
        "BAD_REQUEST",
        _with_token(lambda w: "a" * (2 * MAX_TOKEN_BYTES + 1)),
    )
    yield deny(
        "wrapped identityToken that is forged",
        "TOKEN_ALG_NOT_ALLOWED",
        lambda w: json.dumps({"identityToken": jws({"alg": "none"}, w.claims())}),
    )
    yield case(
        cat,
        "wrapped identityToken that is not a string",
        400,
        "BAD_ATTESTATION_DATA",
        _with_token(lambda w: '{"identityToken": 7}'),
    )
    yield case(
        cat,
        "wrapped identityToken given twice (genuine, then forged)",
        400,
        "BAD_ATTESTATION_DATA",
        _with_token(
            lambda w: (
                f'{{"identityToken": "{w.token(w.pods.api)}", '
                f'"identityToken": "{jws({"alg": "none"}, w.claims())}"}}'
            )
        ),
    )
    yield case(
        cat,
        "refresh with a token under the cluster's kid signed by the attacker",
        403,
        "TOKEN_SIGNATURE_INVALID",
        _with_token(
            lambda w: w.attackers.same_kid.mint(
                "sports-web", "api", w.pods.api.name, w.pods.api.uid, audiences=["identityd"]
            ),
            path="/refresh",
        ),
    )


# --- claim abuse (every token here carries the cluster's genuine signature) ----------------


def _k8s(w: World, pod: DevPod | None = None) -> dict[str, Any]:
    k8s: dict[str, Any] = w.claims(pod)["kubernetes.io"]
    return k8s


def _without(mapping: dict[str, Any], *path: str) -> dict[str, Any]:
    """A deep copy of ``mapping`` with the key at ``path`` removed."""
    copy: dict[str, Any] = json.loads(json.dumps(mapping))
    target = copy
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return copy


def claim_abuse() -> Iterator[Case]:
    cat = "claim abuse"

    def deny(
        name: str, code: str, override: Callable[[World], dict[str, Any]], **mint: Any
    ) -> Case:
        def make(w: World) -> str:
            return w.token(w.pods.api, claims_override=override(w), **mint)

        return case(cat, name, 403, code, _with_token(make))

    def signed(name: str, code: str, claims: Callable[[World], dict[str, Any] | str]) -> Case:
        """Claims written by hand (NaN, huge numbers), signed with the cluster key."""
        return case(
            cat,
            name,
            403,
            code,
            _with_token(
                lambda w: jws(
                    {"alg": "RS256", "kid": w.kid}, claims(w), signer(w.signing_key, "RS256")
                )
            ),
        )

    for label, iss in (
        ("another issuer", "https://evil.example"),
        ("issuer with a trailing slash", "https://kubernetes.default.svc.cluster.local/"),
        ("issuer in upper case", "https://KUBERNETES.default.svc.cluster.local"),
        ("issuer over http", "http://kubernetes.default.svc.cluster.local"),
        ("issuer with trailing whitespace", "https://kubernetes.default.svc.cluster.local "),
    ):
        yield deny(label, "TOKEN_ISSUER_MISMATCH", bound(iss, lambda w, iss: {"iss": iss}))
    yield deny("issuer missing", "TOKEN_ISSUER_MISMATCH", lambda w: {"iss": None})
    yield signed(
        "issuer that is a list",
        "TOKEN_MALFORMED",
        lambda w: {**w.claims(), "iss": [w.cluster.issuer.issuer]},
    )

    for label, aud in (
        ("another audience", ["vault"]),
        ("audience in upper case", ["IDENTITYD"]),
        ("audience with a trailing space", ["identityd "]),
        ("audience a string naming another service", "vault"),
    ):
        yield deny(label, "TOKEN_AUDIENCE_MISMATCH", bound(aud, lambda w, aud: {"aud": aud}))
    yield deny("audience missing", "TOKEN_AUDIENCE_MISMATCH", lambda w: {"aud": None})
    yield deny("audience an empty list", "TOKEN_MALFORMED", lambda w: {"aud": []})
    yield deny("audience a list of numbers", "TOKEN_MALFORMED", lambda w: {"aud": [1]})

    yield case(
        cat,
        "expired two hours ago",
        403,
        "TOKEN_EXPIRED",
        _with_token(lambda w: w.token(w.pods.api, now=time.time() - 7200)),
    )
    yield case(
        cat,
        "expired just past the leeway",
        403,
        "TOKEN_EXPIRED",
        _with_token(lambda w: w.token(w.pods.api, now=time.time() - 3600 - 120)),
    )
    yield case(
        cat,
        "issued ten minutes in the future",
        403,
        "TOKEN_NOT_YET_VALID",
        _with_token(lambda w: w.token(w.pods.api, now=time.time() + 600)),
    )
    yield deny(
        "nbf ten minutes in the future",
        "TOKEN_NOT_YET_VALID",
        lambda w: {"nbf": int(time.time()) + 600},
    )
    yield case(
        cat,
        f"issued longer ago than --max-token-age ({MAX_TOKEN_AGE_SECONDS}s)",
        403,
        "TOKEN_TOO_OLD",
        _with_token(lambda w: w.token(w.pods.api, now=time.time() - 2 * MAX_TOKEN_AGE_SECONDS)),
    )
    yield deny("exp missing", "TOKEN_CLAIMS_MISSING", lambda w: {"exp": None})
    yield deny("iat missing", "TOKEN_CLAIMS_MISSING", lambda w: {"iat": None})
    yield deny("exp a string", "TOKEN_MALFORMED", lambda w: {"exp": "9999999999"})
    yield deny("exp a boolean", "TOKEN_MALFORMED", lambda w: {"exp": True})
    yield deny("exp negative", "TOKEN_MALFORMED", lambda w: {"exp": -1})
    yield signed(
        "exp NaN",
        "TOKEN_MALFORMED",
        lambda w: json.dumps({**w.claims(), "exp": float("nan")}),
    )
    yield signed(
        "exp 1e400 (infinity)",
        "TOKEN_MALFORMED",
        lambda w: json.dumps(w.claims()).replace('"exp": ', '"exp": 1e400, "x": ', 1),
    )

    pieces = (
        ("kubernetes.io",),
        ("kubernetes.io", "namespace"),
        ("kubernetes.io", "pod"),
        ("kubernetes.io", "pod", "name"),
        ("kubernetes.io", "pod", "uid"),
        ("kubernetes.io", "serviceaccount"),
        ("kubernetes.io", "serviceaccount", "name"),
        ("kubernetes.io", "serviceaccount", "uid"),
    )
    for path in pieces:
        yield case(
            cat,
            f"claim {'.'.join(path)} missing",
            403,
            "TOKEN_CLAIMS_MISSING",
            _with_token(
                bound(
                    path,
                    lambda w, path: jws(
                        {"alg": "RS256", "kid": w.kid},
                        _without(w.claims(), *path),
                        signer(w.signing_key, "RS256"),
                    ),
                )
            ),
        )
    yield deny(
        "kubernetes.io a string", "TOKEN_CLAIMS_MISSING", lambda w: {"kubernetes.io": "sports-web"}
    )
    yield deny(
        "kubernetes.io.namespace empty",
        "TOKEN_CLAIMS_MISSING",
        lambda w: {"kubernetes.io": {**_k8s(w), "namespace": ""}},
    )
    yield deny(
        "kubernetes.io.pod a string",
        "TOKEN_CLAIMS_MISSING",
        lambda w: {"kubernetes.io": {**_k8s(w), "pod": "api-1"}},
    )
    yield deny(
        "kubernetes.io.node a string",
        "TOKEN_CLAIMS_MISSING",
        lambda w: {"kubernetes.io": {**_k8s(w), "node": "node-1"}},
    )
    yield deny(
        "kubernetes.io.node without a name",
        "TOKEN_MALFORMED",
        lambda w: {"kubernetes.io": {**_k8s(w), "node": {"uid": "x"}}},
    )
    yield deny(
        "namespace with a C1 control character",
        "TOKEN_MALFORMED",
        lambda w: {"kubernetes.io": {**_k8s(w), "namespace": "sports-web\u0085"}},
    )

    for label, sub in (
        ("sub names another namespace", "system:serviceaccount:payments:api"),
        ("sub names another service account", "system:serviceaccount:sports-web:admin"),
        ("sub with the plural prefix", "system:serviceaccounts:sports-web:api"),
        ("sub with a trailing space", "system:serviceaccount:sports-web:api "),
        ("sub in upper case", "SYSTEM:SERVICEACCOUNT:SPORTS-WEB:API"),
        ("sub of a user", "admin"),
    ):
        yield deny(label, "TOKEN_SUBJECT_MISMATCH", bound(sub, lambda w, sub: {"sub": sub}))
    yield deny("sub missing", "TOKEN_SUBJECT_MISMATCH", lambda w: {"sub": None})
    yield deny(
        "namespace claim differs from sub",
        "TOKEN_SUBJECT_MISMATCH",
        lambda w: {"kubernetes.io": {**_k8s(w), "namespace": "payments"}},
    )
    yield deny(
        "service-account claim differs from sub",
        "TOKEN_SUBJECT_MISMATCH",
        lambda w: {"kubernetes.io": {**_k8s(w), "serviceaccount": {"name": "admin", "uid": "u"}}},
    )
