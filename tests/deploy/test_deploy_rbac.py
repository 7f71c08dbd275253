"""The rendered RBAC grants exactly the permissions identityd needs, nothing more.

Cluster-wide: pods get/list/watch, tokenreviews create, GET on the two
service-account issuer discovery URLs. In the system namespace only:
configmaps get/list/watch/patch, leases create and get/update (by name).
"""

from __future__ import annotations

from deploy_support import SYSTEM_NAMESPACE, Obj, flag_values, one

# (scope, apiGroup, resource, resourceName or "*", verb); nonResourceURLs as
# ("cluster", "nonResourceURL", url, "*", verb).
Permission = tuple[str, str, str, str, str]
LEASE = "identityd-policy-status"
EXPECTED: set[Permission] = {
    ("cluster", "", "pods", "*", "get"),
    ("cluster", "", "pods", "*", "list"),
    ("cluster", "", "pods", "*", "watch"),
    ("cluster", "authentication.k8s.io", "tokenreviews", "*", "create"),
    ("cluster", "nonResourceURL", "/.well-known/openid-configuration", "*", "get"),
    ("cluster", "nonResourceURL", "/openid/v1/jwks", "*", "get"),
    (SYSTEM_NAMESPACE, "", "configmaps", "*", "get"),
    (SYSTEM_NAMESPACE, "", "configmaps", "*", "list"),
    (SYSTEM_NAMESPACE, "", "configmaps", "*", "watch"),
    (SYSTEM_NAMESPACE, "", "configmaps", "*", "patch"),
    (SYSTEM_NAMESPACE, "coordination.k8s.io", "leases", "*", "create"),
    (SYSTEM_NAMESPACE, "coordination.k8s.io", "leases", LEASE, "get"),
    (SYSTEM_NAMESPACE, "coordination.k8s.io", "leases", LEASE, "update"),
}
RBAC_KINDS = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}


def role_permissions(role: Obj, scope: str) -> set[Permission]:
    """Every (apiGroup, resource, name, verb) a role's rules expand to."""
    granted: set[Permission] = set()
    for rule in role.get("rules") or []:
        verbs = rule.get("verbs") or []
        for url in rule.get("nonResourceURLs") or []:
            granted |= {(scope, "nonResourceURL", url, "*", v) for v in verbs}
        names = rule.get("resourceNames") or ["*"]
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                granted |= {(scope, group, resource, n, v) for n in names for v in verbs}
    return granted


def granted(objs: list[Obj]) -> set[Permission]:
    """What the ServiceAccount can do through the rendered bindings."""
    result: set[Permission] = set()
    for binding in objs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = binding["roleRef"]
        role = one(objs, ref["kind"], ref["name"])
        scope = binding["metadata"].get("namespace", "cluster")
        result |= role_permissions(role, scope)
    return result


def test_the_service_account_gets_exactly_the_expected_permissions(base: list[Obj]) -> None:
    assert granted(base) == EXPECTED


def test_every_role_is_bound_and_only_to_identityd(base: list[Obj]) -> None:
    sa = one(base, "ServiceAccount", "identityd")
    subject = {"kind": "ServiceAccount", "name": "identityd", "namespace": SYSTEM_NAMESPACE}
    assert sa["metadata"]["namespace"] == SYSTEM_NAMESPACE
    bindings = [o for o in base if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    roles = [o for o in base if o["kind"] in ("Role", "ClusterRole")]
    assert {o["kind"] for o in base} & RBAC_KINDS == RBAC_KINDS
    for binding in bindings:
        assert binding["subjects"] == [subject], binding["metadata"]["name"]
        assert binding["roleRef"]["kind"] in ("Role", "ClusterRole")
        if binding["kind"] == "RoleBinding":
            assert binding["metadata"]["namespace"] == SYSTEM_NAMESPACE
            assert binding["roleRef"]["kind"] == "Role"
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings}
    assert bound == {(r["kind"], r["metadata"]["name"]) for r in roles}
    for role in roles:
        assert "aggregationRule" not in role
        if role["kind"] == "Role":
            assert role["metadata"]["namespace"] == SYSTEM_NAMESPACE


def test_the_lease_identityd_may_update_is_the_one_it_is_told_to_use(base: list[Obj]) -> None:
    deployment = one(base, "Deployment", "identityd")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flag_values(args, "--leader-elect-resource-name") == [LEASE]


def test_a_wider_grant_is_caught(base: list[Obj]) -> None:
    original = one(base, "ClusterRole", "identityd")
    secrets = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
    role = {**original, "rules": [*original["rules"], secrets]}
    widened = [role if o is original else o for o in base]
    assert granted(widened) - EXPECTED == {("cluster", "", "secrets", "*", "get")}
