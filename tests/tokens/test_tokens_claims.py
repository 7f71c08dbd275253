"""validate_claims: the pure claim checks, table-driven."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from identityd.errors import InvalidToken
from identityd.tokens.base import TokenClaims
from identityd.tokens.claims import TokenReason, validate_claims

ISSUER = "https://kubernetes.default.svc.cluster.local"
NOW = 1_800_000_000
LEEWAY = 30


def base_claims() -> dict[str, Any]:
    """The claims of a real bound token (shape of the TokenRequest API)."""
    return {
        "aud": ["identityd"],
        "exp": NOW + 3600,
        "iat": NOW,
        "iss": ISSUER,
        "jti": "6a1b0c1e-0000-4000-8000-000000000001",
        "kubernetes.io": {
            "namespace": "sports-web",
            "node": {"name": "node-1", "uid": "node-uid"},
            "pod": {"name": "api-1", "uid": "pod-uid"},
            "serviceaccount": {"name": "api", "uid": "sa-uid"},
        },
        "nbf": NOW,
        "sub": "system:serviceaccount:sports-web:api",
    }


def validate(claims: Any, *, now: float = NOW, max_age: int = 0) -> TokenClaims:
    return validate_claims(
        claims,
        issuer=ISSUER,
        audiences=("identityd", "other"),
        now=now,
        leeway=LEEWAY,
        max_age=max_age,
    )


Mutation = Callable[[dict[str, Any]], None]


def set_(path: str, value: Any) -> Mutation:
    def mutate(claims: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        target = claims
        for name in parents:
            target = target[name]
        target[last] = value

    return mutate


def drop(path: str) -> Mutation:
    def mutate(claims: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        target = claims
        for name in parents:
            target = target[name]
        del target[last]

    return mutate


K8S = "kubernetes.io"

# (case id, mutation, time of the check, max_age, expected reason code)
DENY_CASES: list[tuple[str, Mutation, float, int, str]] = [
    ("iss other", set_("iss", "https://evil.example"), NOW, 0, TokenReason.ISSUER_MISMATCH),
    ("iss trailing slash", set_("iss", ISSUER + "/"), NOW, 0, TokenReason.ISSUER_MISMATCH),
    ("iss missing", drop("iss"), NOW, 0, TokenReason.ISSUER_MISMATCH),
    ("iss number", set_("iss", 7), NOW, 0, TokenReason.MALFORMED),
    ("iss list", set_("iss", [ISSUER]), NOW, 0, TokenReason.MALFORMED),
    ("iss NUL", set_("iss", ISSUER + "\x00"), NOW, 0, TokenReason.MALFORMED),
    ("aud other", set_("aud", ["vault"]), NOW, 0, TokenReason.AUDIENCE_MISMATCH),
    ("aud other str", set_("aud", "vault"), NOW, 0, TokenReason.AUDIENCE_MISMATCH),
    ("aud missing", drop("aud"), NOW, 0, TokenReason.AUDIENCE_MISMATCH),
    ("aud empty list", set_("aud", []), NOW, 0, TokenReason.MALFORMED),
    ("aud list of int", set_("aud", [1]), NOW, 0, TokenReason.MALFORMED),
    ("aud dict", set_("aud", {"identityd": 1}), NOW, 0, TokenReason.MALFORMED),
    ("aud control char", set_("aud", ["identityd", "x\n"]), NOW, 0, TokenReason.MALFORMED),
    ("exp missing", drop("exp"), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("exp string", set_("exp", str(NOW + 60)), NOW, 0, TokenReason.MALFORMED),
    ("exp bool", set_("exp", True), NOW, 0, TokenReason.MALFORMED),
    ("exp nan", set_("exp", float("nan")), NOW, 0, TokenReason.MALFORMED),
    ("exp inf", set_("exp", float("inf")), NOW, 0, TokenReason.MALFORMED),
    ("exp huge", set_("exp", 10**400), NOW, 0, TokenReason.MALFORMED),
    ("exp negative", set_("exp", -1), NOW, 0, TokenReason.MALFORMED),
    ("expired", set_("exp", NOW - 3600), NOW, 0, TokenReason.EXPIRED),
    ("exp just outside leeway", set_("exp", NOW - LEEWAY - 1), NOW, 0, TokenReason.EXPIRED),
    ("nbf in future", set_("nbf", NOW + 3600), NOW, 0, TokenReason.NOT_YET_VALID),
    ("nbf just outside leeway", set_("nbf", NOW + LEEWAY + 1), NOW, 0, TokenReason.NOT_YET_VALID),
    ("nbf string", set_("nbf", "soon"), NOW, 0, TokenReason.MALFORMED),
    ("iat missing", drop("iat"), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("iat in future", set_("iat", NOW + LEEWAY + 1), NOW, 0, TokenReason.NOT_YET_VALID),
    ("iat list", set_("iat", [NOW]), NOW, 0, TokenReason.MALFORMED),
    ("too old", set_("exp", NOW + 10**6), NOW + 7200, 3600, TokenReason.TOO_OLD),
    (
        "too old at boundary+1",
        set_("exp", NOW + 10**6),
        NOW + 3600 + LEEWAY + 1,
        3600,
        TokenReason.TOO_OLD,
    ),
    ("k8s missing", drop(K8S), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("k8s string", set_(K8S, "sports-web"), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("k8s list", set_(K8S, []), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("namespace missing", drop(f"{K8S}/namespace"), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("namespace empty", set_(f"{K8S}/namespace", ""), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("namespace int", set_(f"{K8S}/namespace", 5), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("namespace NUL", set_(f"{K8S}/namespace", "sports\x00web"), NOW, 0, TokenReason.MALFORMED),
    ("pod missing", drop(f"{K8S}/pod"), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("pod null", set_(f"{K8S}/pod", None), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("pod name missing", drop(f"{K8S}/pod/name"), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("pod uid missing", drop(f"{K8S}/pod/uid"), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("pod uid dict", set_(f"{K8S}/pod/uid", {}), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("pod uid DEL", set_(f"{K8S}/pod/uid", "uid\x7f"), NOW, 0, TokenReason.MALFORMED),
    ("pod uid C1", set_(f"{K8S}/pod/uid", "uid\x85"), NOW, 0, TokenReason.MALFORMED),
    ("pod name surrogate", set_(f"{K8S}/pod/name", "api\ud800"), NOW, 0, TokenReason.MALFORMED),
    ("sa missing", drop(f"{K8S}/serviceaccount"), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("sa name missing", drop(f"{K8S}/serviceaccount/name"), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("sa uid missing", drop(f"{K8S}/serviceaccount/uid"), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("sa uid null", set_(f"{K8S}/serviceaccount/uid", None), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("node string", set_(f"{K8S}/node", "node-1"), NOW, 0, TokenReason.CLAIMS_MISSING),
    ("node name missing", drop(f"{K8S}/node/name"), NOW, 0, TokenReason.MALFORMED),
    ("node name int", set_(f"{K8S}/node/name", 1), NOW, 0, TokenReason.MALFORMED),
    ("node uid int", set_(f"{K8S}/node/uid", 1), NOW, 0, TokenReason.MALFORMED),
    ("sub missing", drop("sub"), NOW, 0, TokenReason.SUBJECT_MISMATCH),
    (
        "sub other sa",
        set_("sub", "system:serviceaccount:sports-web:admin"),
        NOW,
        0,
        TokenReason.SUBJECT_MISMATCH,
    ),
    (
        "sub other ns",
        set_("sub", "system:serviceaccount:kube-system:api"),
        NOW,
        0,
        TokenReason.SUBJECT_MISMATCH,
    ),
    ("sub user", set_("sub", "admin"), NOW, 0, TokenReason.SUBJECT_MISMATCH),
    ("sub int", set_("sub", 1), NOW, 0, TokenReason.MALFORMED),
    (
        "sub newline",
        set_("sub", "system:serviceaccount:sports-web:api\n"),
        NOW,
        0,
        TokenReason.MALFORMED,
    ),
]


@pytest.mark.parametrize(
    ("mutate", "now", "max_age", "code"),
    [pytest.param(m, n, a, c, id=i) for i, m, n, a, c in DENY_CASES],
)
def test_denied(mutate: Mutation, now: float, max_age: int, code: str) -> None:
    claims = base_claims()
    mutate(claims)
    with pytest.raises(InvalidToken) as caught:
        validate(claims, now=now, max_age=max_age)
    assert caught.value.code == code
    assert caught.value.status == 403


# (case id, mutation, time of the check, max_age)
ALLOW_CASES: list[tuple[str, Mutation, float, int]] = [
    ("as minted", lambda c: None, NOW, 0),
    ("aud as string", set_("aud", "identityd"), NOW, 0),
    ("aud one of several", set_("aud", ["vault", "other"]), NOW, 0),
    ("exp at leeway edge", set_("exp", NOW - LEEWAY), NOW, 0),
    ("exp float", set_("exp", NOW + 0.5), NOW, 0),
    ("nbf at leeway edge", set_("nbf", NOW + LEEWAY), NOW, 0),
    ("nbf absent", drop("nbf"), NOW, 0),
    ("nbf null", set_("nbf", None), NOW, 0),
    ("iat at leeway edge", set_("iat", NOW + LEEWAY), NOW, 0),
    ("age at max_age+leeway", set_("exp", NOW + 10**6), NOW + 3600 + LEEWAY, 3600),
    ("old but no max_age", set_("exp", NOW + 10**6), NOW + 10**5, 0),
    ("node absent", drop(f"{K8S}/node"), NOW, 0),
    ("node uid absent", drop(f"{K8S}/node/uid"), NOW, 0),
    ("extra claims ignored", set_("warnafter", NOW + 60), NOW, 0),
    ("unicode name", set_(f"{K8S}/pod/name", "api-é"), NOW, 0),
]


@pytest.mark.parametrize(
    ("mutate", "now", "max_age"), [pytest.param(m, n, a, id=i) for i, m, n, a in ALLOW_CASES]
)
def test_allowed(mutate: Mutation, now: float, max_age: int) -> None:
    claims = base_claims()
    mutate(claims)
    result = validate(claims, now=now, max_age=max_age)
    assert result.subject == "system:serviceaccount:sports-web:api"
    assert result.verified_by == "jwks"


def test_claims_become_a_value() -> None:
    assert validate(base_claims()) == TokenClaims(
        issuer=ISSUER,
        audience=("identityd",),
        subject="system:serviceaccount:sports-web:api",
        namespace="sports-web",
        service_account="api",
        service_account_uid="sa-uid",
        pod_name="api-1",
        pod_uid="pod-uid",
        node_name="node-1",
        node_uid="node-uid",
        issued_at=NOW,
        expires_at=NOW + 3600,
        not_before=NOW,
        verified_by="jwks",
    )


def test_without_node_and_nbf() -> None:
    claims = base_claims()
    del claims[K8S]["node"], claims["nbf"]
    result = validate(claims)
    assert (result.node_name, result.node_uid, result.not_before) == (None, None, None)


@pytest.mark.parametrize("claims", [None, [], "claims", 3, [("iss", ISSUER)]])
def test_non_object_claims_are_malformed(claims: Any) -> None:
    with pytest.raises(InvalidToken) as caught:
        validate(claims)
    assert caught.value.code == TokenReason.MALFORMED


def test_input_is_not_modified() -> None:
    claims = base_claims()
    before = copy.deepcopy(claims)
    validate(claims)
    assert claims == before


def test_audiences_as_str_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="audiences"):
        validate_claims(
            base_claims(), issuer=ISSUER, audiences="identityd", now=NOW, leeway=0, max_age=0
        )


def test_detail_quotes_are_bounded() -> None:
    claims = base_claims()
    claims["iss"] = "https://evil.example/" + "a" * 5000
    with pytest.raises(InvalidToken) as caught:
        validate(claims)
    assert caught.value.code == TokenReason.ISSUER_MISMATCH
    assert len(caught.value.detail) < 200
