"""The pure core of the TokenReview mode: reading a TokenReview answer, and what the
answer proves about a token whose own claims are read but not trusted."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from identityd.errors import InvalidToken
from identityd.tokens.base import TokenClaims
from identityd.tokens.claims import TokenReason
from identityd.tokens.tokenreview import (
    EXTRA_NODE_NAME,
    EXTRA_NODE_UID,
    EXTRA_POD_NAME,
    EXTRA_POD_UID,
    ReviewReason,
    TokenReviewUnavailable,
    claims_from_review,
    parse_review,
)

AUDIENCES = ("identityd",)

TOKEN = TokenClaims(
    issuer="https://kubernetes.default.svc.cluster.local",
    audience=("identityd", "vault"),
    subject="system:serviceaccount:sports-web:api",
    namespace="sports-web",
    service_account="api",
    service_account_uid="sa-uid",
    pod_name="api-1",
    pod_uid="pod-uid",
    node_name="node-7",
    node_uid="node-uid",
    issued_at=1_800_000_000,
    expires_at=1_800_003_600,
    not_before=1_800_000_000,
)

ANSWER: dict[str, Any] = {
    "kind": "TokenReview",
    "apiVersion": "authentication.k8s.io/v1",
    "status": {
        "authenticated": True,
        "audiences": ["identityd"],
        "user": {
            "username": "system:serviceaccount:sports-web:api",
            "uid": "sa-uid",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:sports-web",
                       "system:authenticated"],
            "extra": {
                EXTRA_POD_NAME: ["api-1"],
                EXTRA_POD_UID: ["pod-uid"],
                EXTRA_NODE_NAME: ["node-7"],
                EXTRA_NODE_UID: ["node-uid"],
                "authentication.kubernetes.io/credential-id": ["JTI=abc"],
            },
        },
    },
}


def answer(change: Any = None) -> dict[str, Any]:
    document = copy.deepcopy(ANSWER)
    if change is not None:
        change(document["status"])
    return document


def user(status: dict[str, Any]) -> dict[str, Any]:
    value: dict[str, Any] = status["user"]
    return value


def test_a_full_answer_is_read() -> None:
    status = parse_review(answer())
    assert status.authenticated
    assert status.username == "system:serviceaccount:sports-web:api"
    assert status.uid == "sa-uid"
    assert status.audiences == ("identityd",)
    assert status.extra[EXTRA_POD_UID] == ("pod-uid",)
    assert status.groups[-1] == "system:authenticated"
    assert status.error == ""


def test_a_denial_as_the_api_server_writes_it() -> None:
    """authenticated is omitempty: absent means false; user is then {}."""
    status = parse_review({"status": {"user": {}, "error": "invalid bearer token"}})
    assert not status.authenticated
    assert (status.username, status.uid, status.extra, status.audiences) == ("", None, {}, ())
    assert status.error == "invalid bearer token"


@pytest.mark.parametrize(
    "document",
    [
        None,
        [],
        {"kind": "Status", "code": 500},
        {"status": "ok"},
        {"status": {"authenticated": "true"}},
        {"status": {"authenticated": True, "user": []}},
        {"status": {"authenticated": True, "user": {"username": 7}}},
        {"status": {"authenticated": True, "user": {"extra": {"k": "v"}}}},
        {"status": {"authenticated": True, "user": {"extra": []}}},
        {"status": {"authenticated": True, "audiences": "identityd"}},
        {"status": {"authenticated": False, "error": ["x"]}},
    ],
)
def test_an_answer_that_is_no_token_review_is_unavailable(document: object) -> None:
    """A broken answer is a broken dependency (503), not a verdict on the token."""
    with pytest.raises(TokenReviewUnavailable) as caught:
        parse_review(document)
    assert caught.value.status == 503


def test_claims_are_the_reviewed_ones() -> None:
    claims = claims_from_review(parse_review(answer()), TOKEN, audiences=AUDIENCES)
    assert claims == replace(TOKEN, audience=("identityd",), verified_by="tokenreview")


def test_the_node_of_the_token_fills_a_review_without_one() -> None:
    def no_node(status: dict[str, Any]) -> None:
        del user(status)["extra"][EXTRA_NODE_NAME], user(status)["extra"][EXTRA_NODE_UID]

    claims = claims_from_review(parse_review(answer(no_node)), TOKEN, audiences=AUDIENCES)
    assert (claims.node_name, claims.node_uid) == ("node-7", "node-uid")


def test_only_configured_audiences_are_granted() -> None:
    def more(status: dict[str, Any]) -> None:
        status["audiences"] = ["vault", "identityd", "other"]

    claims = claims_from_review(parse_review(answer(more)), TOKEN,
                                audiences=("identityd", "other", "unused"))
    assert claims.audience == ("identityd", "other")


def _set(*path: str, value: Any) -> Any:
    """A change of the status at ``path``; ``value=_DELETE`` removes the member."""
    def change(status: dict[str, Any]) -> None:
        *parents, last = path
        node = status
        for part in parents:
            node = node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return change


def _extra(name: str, value: Any) -> Any:
    return _set("user", "extra", f"authentication.kubernetes.io/{name}", value=value)


_DELETE = object()
_USERNAME = ("user", "username")


@pytest.mark.parametrize(
    ("change", "code", "detail"),
    [
        (_set("authenticated", value=False), ReviewReason.DENIED, "did not authenticate"),
        (_set("error", value="x"), None, None),  # beside authenticated=true it is no deny
        (_set("audiences", value=[]), TokenReason.AUDIENCE_MISMATCH, "granted none"),
        (_set("audiences", value=["vault"]), TokenReason.AUDIENCE_MISMATCH, "granted none"),
        (_set(*_USERNAME, value="alice"), TokenReason.SUBJECT_MISMATCH, "not a service account"),
        (_set(*_USERNAME, value="system:serviceaccount:sports-web"),
         TokenReason.SUBJECT_MISMATCH, "not a service account"),
        (_set(*_USERNAME, value="system:serviceaccount::api"),
         TokenReason.SUBJECT_MISMATCH, "not a service account"),
        (_set(*_USERNAME, value="system:serviceaccount:sports-web:api:x"),
         TokenReason.SUBJECT_MISMATCH, "not a service account"),
        (_set(*_USERNAME, value="system:serviceaccount:payments:api"),
         TokenReason.SUBJECT_MISMATCH, "namespace"),
        (_set(*_USERNAME, value="system:serviceaccount:sports-web:billing"),
         TokenReason.SUBJECT_MISMATCH, "service account"),
        (_set("user", "uid", value="other"), TokenReason.SUBJECT_MISMATCH, "service account uid"),
        (_set("user", "uid", value=_DELETE), TokenReason.CLAIMS_MISSING, "service account uid"),
        (_extra("pod-name", ["api-2"]), TokenReason.SUBJECT_MISMATCH, "pod name"),
        (_extra("pod-uid", ["other"]), TokenReason.SUBJECT_MISMATCH, "pod uid"),
        (_extra("pod-uid", ["a", "b"]), TokenReason.SUBJECT_MISMATCH, "one value"),
        (_extra("pod-uid", [""]), TokenReason.SUBJECT_MISMATCH, "one value"),
        (_extra("pod-uid", _DELETE), TokenReason.CLAIMS_MISSING, "no pod"),
        (_extra("pod-name", _DELETE), TokenReason.CLAIMS_MISSING, "no pod"),
        (_extra("node-name", ["node-8"]), TokenReason.SUBJECT_MISMATCH, "node name"),
        (_extra("node-uid", ["other"]), TokenReason.SUBJECT_MISMATCH, "node uid"),
    ],
)
def test_what_the_review_does_not_prove_is_denied(
    change: Any, code: str | None, detail: str | None,
) -> None:
    status = parse_review(answer(change))
    if code is None:
        assert claims_from_review(status, TOKEN, audiences=AUDIENCES).pod_uid == "pod-uid"
        return
    with pytest.raises(InvalidToken) as caught:
        claims_from_review(status, TOKEN, audiences=AUDIENCES)
    assert caught.value.code == code
    assert detail is not None and detail in caught.value.detail


def test_a_token_without_node_against_a_review_with_one_is_a_mismatch() -> None:
    token = replace(TOKEN, node_name=None, node_uid=None)
    with pytest.raises(InvalidToken) as caught:
        claims_from_review(parse_review(answer()), token, audiences=AUDIENCES)
    assert caught.value.code == TokenReason.SUBJECT_MISMATCH


def test_the_api_servers_error_is_the_detail_of_a_denial() -> None:
    denial = {"status": {"user": {}, "error": "[invalid bearer token, service account token "
                                              "has been invalidated]"}}
    with pytest.raises(InvalidToken) as caught:
        claims_from_review(parse_review(denial), TOKEN, audiences=AUDIENCES)
    assert caught.value.code == "TOKEN_REVIEW_DENIED"
    assert caught.value.status == 403
    assert caught.value.detail == ("[invalid bearer token, service account token has been "
                                   "invalidated]")
