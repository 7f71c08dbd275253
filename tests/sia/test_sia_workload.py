"""Who the agent thinks it is: environment first, token as fallback; the names it asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from identityd.errors import ConfigError
from identityd.keys.issuer import TokenIssuer
from identityd.sia.config import AgentConfig
from identityd.sia.workload import (
    PodFacts,
    plan_certificate,
    pod_facts,
    read_token,
    token_claims,
)

UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
ENV = {
    "POD_NAMESPACE": "sports-web",
    "POD_NAME": "api-1",
    "POD_UID": UID,
    "POD_IP": "10.1.2.3",
    "POD_SERVICE_ACCOUNT": "api",
}


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer("https://kubernetes.default.svc.cluster.local", key_type="EC")


def claims(
    issuer: TokenIssuer, namespace: str = "sports-web", sa: str = "api", uid: str = UID
) -> dict[str, Any]:
    return token_claims(issuer.mint(namespace, sa, "api-1", uid, audiences=["identityd"]))


def test_environment_and_token_agree(issuer: TokenIssuer) -> None:
    facts = pod_facts(claims(issuer), ENV)
    assert facts == PodFacts("sports-web", "api-1", UID, "api", ("10.1.2.3",), ())


def test_token_fills_in_what_the_environment_does_not_say(issuer: TokenIssuer) -> None:
    facts = pod_facts(claims(issuer), {})
    assert (facts.namespace, facts.name, facts.uid, facts.service_account, facts.ips) == (
        "sports-web",
        "api-1",
        UID,
        "api",
        (),
    )


def test_environment_wins_and_disagreements_are_reported(issuer: TokenIssuer) -> None:
    facts = pod_facts(claims(issuer, namespace="payments", sa="billing", uid="other"), ENV)
    assert (facts.namespace, facts.uid, facts.service_account) == ("sports-web", UID, "api")
    assert [c.split(":")[0] for c in facts.conflicts] == ["namespace", "uid", "service_account"]


def test_pod_ips_dual_stack_normalised() -> None:
    env = {**ENV, "POD_IPS": "10.1.2.3, fd00:0:0::7"}
    facts = pod_facts({}, env)
    assert facts.ips == ("10.1.2.3", "fd00::7")
    with pytest.raises(ConfigError) as err:
        pod_facts({}, {**ENV, "POD_IP": "not-an-ip"})
    assert err.value.code == "SIA_POD_ENV_INVALID"


def test_an_unknown_pod_is_a_clear_error() -> None:
    with pytest.raises(ConfigError) as err:
        pod_facts({"kubernetes.io": {"namespace": "ns"}}, {})
    assert err.value.code == "SIA_POD_UNKNOWN"
    assert "uid, service_account" in err.value.detail


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (None, "SIA_TOKEN_UNREADABLE"),
        (b"  \n", "SIA_TOKEN_UNREADABLE"),
        (b"\xff\xfe", "SIA_TOKEN_MALFORMED"),
    ],
)
def test_read_token_failures(tmp_path: Path, content: bytes | None, code: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        read_token(path)
    assert err.value.code == code


def test_read_token_strips_the_newline(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("a.b.c\n")
    assert read_token(tmp_path / "token") == "a.b.c"
    with pytest.raises(ConfigError) as err:
        token_claims("a.b.c")
    assert err.value.code == "SIA_TOKEN_MALFORMED"


def test_plan_follows_design_section_3() -> None:
    facts = PodFacts("sports-web", "api-1", UID, "api", ("10.1.2.3",))
    plan = plan_certificate(facts, AgentConfig(ca_url="https://ca"))
    assert plan.common_name == "sports.web.api"
    assert (plan.domain, plan.service, plan.instance_id) == ("sports.web", "api", UID)
    assert plan.dns == (
        "api.sports-web.k8s.example.com",
        f"{UID}.instanceid.athenz.k8s.example.com",
    )
    assert plan.ips == ("10.1.2.3",)
    assert plan.uris == ("spiffe://sports.web/sa/api", f"athenz://instanceid/sys.auth.k8s/{UID}")


def test_plan_options_k8s_spiffe_and_extra_dns() -> None:
    facts = PodFacts("a--b-c", "p", UID, "sa", ())
    config = AgentConfig(
        ca_url="https://ca",
        spiffe="k8s",
        trust_domain="td",
        dns_suffix="s.example",
        provider="p.k8s",
        extra_dns=("extra.example",),
    )
    plan = plan_certificate(facts, config)
    assert plan.common_name == "a-b.c.sa"
    assert plan.dns[-1] == "extra.example"
    assert plan.uris == ("spiffe://td/ns/a--b-c/sa/sa", f"athenz://instanceid/p.k8s/{UID}")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"ca_url": "http://ca"}, "https"),
        ({"key_type": "DSA"}, "key-type"),
        ({"key_type": "RSA", "key_bits": 1024}, "key-bits"),
        ({"key_bits": 384}, "key-bits"),
        ({"refresh_fraction": 1.0}, "refresh-fraction"),
        ({"jitter_fraction": 0.8}, "jitter"),
        ({"retry_initial": 10.0, "retry_max": 1.0}, "retry"),
        ({"once_attempts": 0}, "once-attempts"),
        ({"expiry_minutes": 0}, "expiry"),
        ({"spiffe": "other"}, "spiffe"),
    ],
)
def test_config_is_validated(overrides: dict[str, Any], needle: str) -> None:
    fields: dict[str, Any] = {"ca_url": "https://ca", **overrides}
    with pytest.raises(ConfigError, match=needle):
        AgentConfig(**fields)
