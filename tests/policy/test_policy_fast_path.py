"""fast.rego is a shortcut, not a second policy: with it or without it every decision is
the same (allow, each reason's text, attributes), and legitimate requests of the shapes
identityd produces take it (otherwise every allow evaluates each check one by one)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import regopy
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from identityd.callback.policy_input import build_input
from identityd.callback.request import CallbackRequest, parse_request
from identityd.inventory.base import PodRecord
from identityd.keys.csr import build_csr, generate_key, parse_csr, parse_public_key
from identityd.policy.cases import load_bases, load_cases
from identityd.policy.embedded import EmbeddedEngine
from identityd.policy.sources import load_policy_dir
from identityd.settings import IdentitySettings
from identityd.tokens.base import TokenClaims

POLICIES = Path(__file__).resolve().parents[2] / "policies"
HEADER = "package identityd\n\nimport rego.v1\n\n"
MODULES = load_policy_dir(POLICIES)
# The same policies without the shortcut: every decision takes the checks one by one.
WITHOUT_FAST = {**MODULES, "identityd/fast.rego": HEADER + "fast_allow := false\n"}
# A check that always fails: with it, a request is allowed only when fast_allow vouched
# for it, because then the checks (`violations`) are not evaluated at all.
PROBE = {**MODULES, "probe.rego": HEADER + 'violations contains "PROBE: the checks ran"\n'}
BASES = load_bases(POLICIES / "tests" / "_bases.yaml")

# One set of engines for the module: loading three policy sets per test is most of the time.
in_module_loop = pytest.mark.asyncio(loop_scope="module")
UID = BASES["allow"]["token"]["pod"]["uid"]

Path_ = tuple[str | int, ...]


def _set(doc: dict[str, Any], path: Path_, value: object) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    target: Any = out
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = copy.deepcopy(value)
    return out


def _with(base: str, *changes: tuple[Path_, object]) -> dict[str, Any]:
    doc = BASES[base]
    for path, value in changes:
        doc = _set(doc, path, value)
    return doc


def _built_by_identityd(
    csr_kind: str, *, with_csr: bool = True, namespace: str = "sports-web",
    domain: str = "sports.web", service: str = "api",
) -> dict[str, Any]:
    """An input as identityd's own builder makes it from a real key: a CSR and
    csrPublicKey as the dev CA sends them, or csrPublicKey alone as ZTS usually does."""
    key = generate_key(csr_kind)
    sans = {
        "dns": [f"{service}.{namespace}.k8s.example.com",
                f"{UID}.instanceid.athenz.k8s.example.com"],
        "ips": ["10.1.2.3"],
        "uris": [f"spiffe://{domain}/sa/{service}", f"athenz://instanceid/sys.auth.k8s/{UID}"],
    }
    pem = build_csr(
        key, cn=f"{domain}.{service}", dns=sans["dns"], ips=sans["ips"], uris=sans["uris"],
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    body = {
        "provider": "sys.auth.k8s", "domain": domain, "service": service,
        "attestationData": "a.b.c",
        "attributes": {
            "instanceId": UID, "clientIP": "10.1.2.3", "sanDNS": ",".join(sans["dns"]),
            "sanIP": "10.1.2.3", "sanURI": ",".join(sans["uris"]), "csrPublicKey": public_pem,
            **({"csr": pem} if with_csr else {}),
        },
    }
    request: CallbackRequest = parse_request("instance", json.dumps(body).encode())
    claims = TokenClaims(
        issuer="https://kubernetes.default.svc", audience=("identityd",),
        subject=f"system:serviceaccount:{namespace}:{service}", namespace=namespace,
        service_account=service, service_account_uid="sa-uid", pod_name="api-7d9f", pod_uid=UID,
        node_name="node-1", node_uid="node-uid", issued_at=1000, expires_at=4600, not_before=1000,
    )
    pod = PodRecord(
        uid=UID, namespace=namespace, name="api-7d9f", service_account=service,
        phase="Running", ips=("10.1.2.3",), node_name="node-1", labels={"app": "api"},
    )
    csr = parse_csr(pem) if with_csr else None
    return build_input(
        request, claims, pod, csr, IdentitySettings(), now=1100,
        public_key=parse_public_key(public_pem),
    )


def _rsa(section: str, bits: int) -> list[tuple[Path_, object]]:
    return [((section, "key_type"), "RSA"), ((section, "key_bits"), bits), ((section, "curve"), "")]


LEGITIMATE: dict[str, dict[str, Any]] = {
    "base allow": BASES["allow"],
    "base allow without CSR": BASES["allow_no_csr"],
    "base refresh": BASES["refresh"],
    "RSA key": _with("allow", *_rsa("csr", 3072), *_rsa("key", 3072)),
    "RSA key from csrPublicKey": _with("allow_no_csr", *_rsa("key", 2048)),
    "P-384 key from csrPublicKey": _with(
        "allow_no_csr", (("key", "key_bits"), 384), (("key", "curve"), "secp384r1")),
    "token without a node": _with("allow", (("token", "node"), None)),
    "dual-stack pod": _with("allow", (("pod", "ips"), ["10.1.2.3", "fd00::1"])),
    "two DNS suffixes": _with("allow", (("config", "dns_suffixes"),
                                        ["k8s.example.com", "k8s.example.org"])),
    "wildcard and Kubernetes SPIFFE SANs": _with(
        "allow",
        (("request", "attributes", "sanDNS"), ["*.api.sports-web.k8s.example.com"]),
        (("csr", "dns"), ["*.api.sports-web.k8s.example.com"]),
        (("request", "attributes", "sanURI"), ["spiffe://cluster.local/ns/sports-web/sa/api"]),
        (("csr", "uris"), ["spiffe://cluster.local/ns/sports-web/sa/api"]),
    ),
    "uppercase and underscore service (an Athenz simple name)": _with(
        "allow",
        *[((section, "service_account"), "_Web_API-2") for section in ("token", "pod")],
        (("request", "service"), "_Web_API-2"),
        (("request", "attributes", "sanDNS"), ["_Web_API-2.sports-web.k8s.example.com"]),
        (("csr", "dns"), ["_Web_API-2.sports-web.k8s.example.com"]),
        (("request", "attributes", "sanURI"), ["spiffe://sports.web/sa/_Web_API-2"]),
        (("csr", "uris"), ["spiffe://sports.web/sa/_Web_API-2"]),
        (("csr", "cn"), "sports.web._Web_API-2"),
    ),
    "shorter lifetime asked by the pod": _with(
        "allow", (("pod", "annotations"), {"identityd.io/cert-expiry-minutes": "60"})),
    "built by identityd, EC key": _built_by_identityd("EC"),
    "built by identityd, RSA key": _built_by_identityd("RSA"),
    "built by identityd, csrPublicKey only, EC key": _built_by_identityd("EC", with_csr=False),
    "built by identityd, csrPublicKey only, RSA key": _built_by_identityd("RSA", with_csr=False),
}

# Allowed, but in a shape fast.rego does not vouch for: the checks decide.
SLOW_BUT_ALLOWED: dict[str, dict[str, Any]] = {
    "CSR SANs in another order than the request's": _with(
        "allow", (("csr", "dns"), list(reversed(BASES["allow"]["csr"]["dns"])))),
    "sanIP not in canonical form": _with(
        "allow_no_csr", (("pod", "ips"), ["10.1.2.3", "fd00::1"]),
        (("request", "attributes", "sanIP"), ["FD00::1"]), (("facts", "san_ips"), ["fd00::1"])),
    # Neither a CSR nor csrPublicKey: ZTS always sends one, so the shortcut leaves it out.
    "no key at all": BASES["allow_no_key"],
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines() -> AsyncIterator[dict[str, EmbeddedEngine]]:
    made: dict[str, EmbeddedEngine] = {}
    try:
        for name, modules in (("with", MODULES), ("without", WITHOUT_FAST), ("probe", PROBE)):
            made[name] = EmbeddedEngine()
            await made[name].load(modules)
        yield made
    finally:
        for engine in made.values():
            await engine.aclose()


@in_module_loop
@pytest.mark.parametrize("name", list(LEGITIMATE))
async def test_legitimate_requests_take_the_shortcut(
    engines: dict[str, EmbeddedEngine], name: str
) -> None:
    doc = LEGITIMATE[name]
    decision = await engines["with"].evaluate(doc)
    assert decision.allow, decision.reasons
    assert await engines["without"].evaluate(doc) == decision
    probed = await engines["probe"].evaluate(doc)
    assert probed.allow, f"fast_allow did not hold: {probed.reasons}"


@in_module_loop
@pytest.mark.parametrize("name", list(SLOW_BUT_ALLOWED))
async def test_other_shapes_are_decided_by_the_checks(
    engines: dict[str, EmbeddedEngine], name: str
) -> None:
    doc = SLOW_BUT_ALLOWED[name]
    decision = await engines["with"].evaluate(doc)
    assert decision.allow, decision.reasons
    assert await engines["without"].evaluate(doc) == decision
    assert (await engines["probe"].evaluate(doc)).codes == ("PROBE",)


@in_module_loop
async def test_dotted_service_account_is_denied_with_the_shortcut_too(
    engines: dict[str, EmbeddedEngine],
) -> None:
    # Service account web.api in namespace sports asks for the CN sports.web.api, the
    # CN of service api in domain sports.web: every other check passes.
    doc = _built_by_identityd("EC", namespace="sports", domain="sports", service="web.api")
    assert doc["csr"]["cn"] == "sports.web.api"
    for name in ("with", "without"):
        decision = await engines[name].evaluate(doc)
        assert not decision.allow
        assert decision.codes == ("SERVICE_NAME_INVALID",), decision.reasons
    assert CONTRACT.check(doc) is False


@in_module_loop
async def test_every_case_decides_the_same_without_the_shortcut(
    engines: dict[str, EmbeddedEngine],
) -> None:
    cases = load_cases(POLICIES / "tests")
    for case in cases:
        with_fast = await engines["with"].evaluate(case.input)
        assert await engines["without"].evaluate(case.input) == with_fast, case.name


# --- the one-way contract, input by input -----------------------------------------------
#
# With fast_allow false the decision is the checks' by construction, so the property
# to test is: fast_allow => no violation. Asked directly of regopy, which answers
# fast_allow cheaply and the violations only where it holds.


class Contract:
    def __init__(self) -> None:
        self._fast = self._entrypoint("identityd/fast_allow")
        self._violations = self._entrypoint("identityd/violations")

    @staticmethod
    def _entrypoint(path: str) -> tuple[Any, Any, str]:
        interpreter = regopy.Interpreter()
        interpreter.log_level = regopy.LogLevel.NONE
        for module_id, source in MODULES.items():
            interpreter.add_module(module_id, source)
        return interpreter, interpreter.build(None, [path]), path

    @staticmethod
    def _value(entrypoint: tuple[Any, Any, str], doc: dict[str, Any]) -> Any:
        interpreter, bundle, path = entrypoint
        # regopy's own dict input: the documents here hold plain ASCII strings without
        # quotes or backslashes, which it stores the same as JSON text, and faster.
        interpreter.set_input(doc)
        text = str(interpreter.query_bundle_entrypoint(bundle, path))
        return None if text == "undefined" else json.loads(text)["expressions"][0]

    def violations(self, doc: dict[str, Any]) -> list[str]:
        return list(self._value(self._violations, doc))

    def check(self, doc: dict[str, Any]) -> bool:
        """Whether fast_allow holds; fails the test if it does with a violation."""
        if self._value(self._fast, doc) is not True:
            return False
        assert self._value(self._violations, doc) == [], json.dumps(doc)
        return True


CONTRACT = Contract()

# One value of each JSON type, empty and not, and the near misses that matter here.
REPRESENTATIVES: list[object] = [
    None, True, False, 0, -1, 5000, "", "x", [], ["x"], [1], [None], {}, {"x": "y"},
]


def _paths(doc: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    if prefix:
        yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*prefix, index))


def _changes(value: object) -> Iterator[tuple[str, object]]:
    for other in REPRESENTATIVES:
        yield "replace", other
    if isinstance(value, str) and value:
        yield from (("replace", value + "x"), ("replace", value[:-1]), ("replace", value.upper()))
    if isinstance(value, list):
        yield from (("append", 1), ("append", None), ("append", "x"), ("append", []))
        # The same items in the wrong container: iteration and `in` do not notice.
        yield "replace", {str(index): item for index, item in enumerate(value)}
    if isinstance(value, str | int | bool):
        yield "replace", [value]
    yield "delete", None


def _changed(doc: dict[str, Any], path: Path_, action: str, value: object) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    target: Any = out
    for part in path[:-1]:
        target = target[part]
    if action == "delete":
        if isinstance(target, dict):
            del target[path[-1]]
        else:
            target.pop(path[-1])
    elif action == "append":
        target[path[-1]].append(copy.deepcopy(value))
    else:
        target[path[-1]] = copy.deepcopy(value)
    return out


# Each base with the sections whose checks differ from the `allow` sweep's.
SWEEP_BASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "allow": (BASES["allow"], ()),
    "allow_no_csr": (BASES["allow_no_csr"], ("csr", "key", "facts", "request")),
    "refresh": (BASES["refresh"], ("kind", "config", "pod")),
    "rsa": (LEGITIMATE["RSA key"], ("csr", "key", "config")),
    "rsa_public_key": (LEGITIMATE["RSA key from csrPublicKey"], ("csr", "key", "config")),
}


@pytest.mark.parametrize("base", list(SWEEP_BASES))
def test_any_single_change_keeps_the_contract(base: str) -> None:
    doc, sections = SWEEP_BASES[base]
    assert CONTRACT.check(doc)
    held = 0
    for path in _paths(doc):
        if sections and path[0] not in sections:
            continue
        value: Any = doc
        for part in path:
            value = value[part]
        for action, other in _changes(value):
            held += CONTRACT.check(_changed(doc, path, action, other))
    # Some changes are harmless (fields the policies do not read): the sweep reaches
    # the fast path, so the assertion inside check() was exercised.
    assert held > 0


# Fields the policies compare with each other: changed together, they still agree.
# The `allow` base unless a twin names another legitimate input.
TWIN_BASES: dict[tuple[Path_, ...], dict[str, Any]] = {
    (("key", "key_bits"), ("config", "min_rsa_bits")): LEGITIMATE["RSA key"],
}
TWINS: list[tuple[Path_, ...]] = [
    *TWIN_BASES,
    (("key", "curve"), ("config", "allowed_ec_curves", 0)),
    (("token", "namespace"), ("pod", "namespace")),
    (("token", "service_account"), ("pod", "service_account"), ("request", "service")),
    (("token", "pod", "name"), ("pod", "name")),
    (("token", "pod", "uid"), ("pod", "uid"), ("request", "attributes", "instanceId")),
    (("config", "provider"), ("request", "provider")),
    (("token", "node", "name"), ("pod", "node")),
    (("facts", "san_ips"), ("request", "attributes", "sanIP"), ("csr", "ips")),
    (("request", "attributes", "sanDNS"), ("csr", "dns")),
    (("request", "attributes", "sanURI"), ("csr", "uris")),
]


@pytest.mark.parametrize("twins", TWINS, ids=lambda t: "=".join(".".join(map(str, p)) for p in t))
def test_compared_fields_changed_together_keep_the_contract(twins: tuple[Path_, ...]) -> None:
    for value in [*REPRESENTATIVES, {"x": "10.1.2.3"}, ["10.1.2.3", 1]]:
        doc = TWIN_BASES.get(twins, BASES["allow"])
        for path in twins:
            doc = _changed(doc, path, "replace", value)
        CONTRACT.check(doc)


# Athenz names (identity.rego, fast.rego): the checks match the request's domain and
# service against Athenz's patterns, the shortcut against the same sets without a regex.
# A world where the token, the pod, the request, the SANs and the CN all agree on one
# namespace and service account, so the names are the only thing left to decide on.
SIMPLE_NAME = r"[a-zA-Z0-9_][a-zA-Z0-9_-]*"
DOMAIN_NAME = rf"{SIMPLE_NAME}(\.{SIMPLE_NAME})*"
NAMESPACES = [
    "sports-web", "sports", "Sports-Web--", "sports---web", "a--b", "a.b", "a_b", "sports-",
    "-sports", "--sports", "sports.", "a..b", "a b", "a/b", "a:b", "-", ".",
]
SERVICES = [
    "api", "_", "_Web_API-2", "api-", "9", "web.api", "-api", "a b", "api*", "a/b", "a:b", ".",
    "api.", ".api", "api%", "api@x",
]


def _named(namespace: str, service: str) -> dict[str, Any]:
    domain = namespace.replace("--", "_").replace("-", ".").replace("_", "-")
    dns = [f"{UID}.instanceid.athenz.k8s.example.com"]
    uris = [f"athenz://instanceid/sys.auth.k8s/{UID}"]
    return _with(
        "allow",
        *[((section, "namespace"), namespace) for section in ("token", "pod")],
        *[((section, "service_account"), service) for section in ("token", "pod")],
        (("request", "domain"), domain), (("request", "service"), service),
        (("request", "attributes", "sanDNS"), dns), (("csr", "dns"), dns),
        (("request", "attributes", "sanURI"), uris), (("csr", "uris"), uris),
        (("csr", "cn"), f"{domain}.{service}"),
    )


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_athenz_names_decide_the_shortcut_and_the_checks_alike(namespace: str) -> None:
    for service in SERVICES:
        doc = _named(namespace, service)
        domain = doc["request"]["domain"]
        expected = {
            code for code, valid in (
                ("DOMAIN_NAME_INVALID", re.fullmatch(DOMAIN_NAME, domain)),
                ("SERVICE_NAME_INVALID", re.fullmatch(SIMPLE_NAME, service)),
            ) if not valid
        }
        codes = {v.split(":", 1)[0] for v in CONTRACT.violations(doc)}
        assert codes == expected, (namespace, service)
        # Exact on this family: vouches for every valid pair (so such pods stay on
        # the shortcut), and for no invalid one.
        assert CONTRACT.check(doc) == (not expected), (namespace, service)


@st.composite
def variants(draw: st.DrawFn) -> dict[str, Any]:
    doc = BASES[draw(st.sampled_from(["allow", "allow_no_csr", "allow_no_key", "refresh"]))]
    for _ in range(draw(st.integers(2, 4))):
        path = draw(st.sampled_from(list(_paths(doc))))
        value: Any = doc
        for part in path:
            value = value[part]
        action, other = draw(st.sampled_from(list(_changes(value))))
        doc = _changed(doc, path, action, other)
    return doc


@settings(max_examples=300, deadline=None, derandomize=True)
@given(variants())
def test_any_mix_of_changes_keeps_the_contract(doc: dict[str, Any]) -> None:
    CONTRACT.check(doc)
