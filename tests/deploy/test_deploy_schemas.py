"""Every rendered object validates against the Kubernetes OpenAPI schemas, offline.

kubernetes-validate ships the schemas of each Kubernetes minor release; strict
mode also refuses unknown fields, so a misspelt key fails here, not at apply
time. Checked against every release from MIN_KUBERNETES to the newest shipped.
"""

from __future__ import annotations

import copy
import importlib
from types import ModuleType

import pytest
from deploy_support import Obj, one, pod_spec
from packaging.version import Version

# policy/v1 PodDisruptionBudget, Pod Security Admission labels and the
# kubernetes.io/metadata.name namespace label all hold from 1.25 on.
MIN_KUBERNETES = "1.25"


def validator() -> ModuleType:
    # Imported here so that a missing test dependency fails these tests only,
    # with the fix in the message, instead of the whole collection.
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        pytest.fail(
            "kubernetes-validate is missing: it is a test dependency (pip install -e '.[test]')"
        )


def versions() -> list[str]:
    shipped = sorted({Version(v) for v in validator().utils.all_versions()})
    floor = Version(MIN_KUBERNETES)
    return [f"{v.major}.{v.minor}" for v in shipped if v >= floor]


def schema_errors(objs: list[Obj]) -> list[str]:
    kubernetes_validate = validator()
    errors = []
    for version in versions():
        for obj in objs:
            where = f"{obj['kind']}/{obj['metadata']['name']} on {version}"
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{where}: {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(f"{where}: {exc.message}")
    return errors


def test_schemas_cover_the_supported_releases() -> None:
    assert versions()[0] == MIN_KUBERNETES
    assert len(versions()) >= 2


def test_base_validates(base: list[Obj]) -> None:
    assert schema_errors(base) == []


def test_sia_example_validates(sia_example: list[Obj]) -> None:
    assert schema_errors(sia_example) == []


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(
            lambda s: s["containers"][0]["securityContext"].update(runAsNonroot=True),
            id="misspelt-field",
        ),
        pytest.param(
            lambda s: s["containers"][0].update(ports=[{"containerPort": "https"}]), id="wrong-type"
        ),
        pytest.param(lambda s: s["volumes"][0].pop("name"), id="missing-required"),
    ],
)
def test_a_broken_deployment_is_refused(base: list[Obj], mutate: object) -> None:
    broken = copy.deepcopy(one(base, "Deployment", "identityd"))
    mutate(pod_spec(broken))  # type: ignore[operator]
    assert schema_errors([broken]) != []
