"""The kustomizations rendered once per session with the real kubectl.

Without kubectl the rendering tests skip, saying why; with
IDENTITYD_REQUIRE_KUBECTL=1 (scripts/ci-deploy-checks.sh) they fail instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from deploy_support import K8S, K8S_PATCH, REQUIRE_KUBECTL_ENV, KubectlMissing, Obj, render


def _render_or_skip(kustomization: Path) -> list[Obj]:
    try:
        return render(kustomization)
    except KubectlMissing as exc:
        if os.environ.get(REQUIRE_KUBECTL_ENV) == "1":
            pytest.fail(f"{exc} and {REQUIRE_KUBECTL_ENV}=1")
        pytest.skip(f"{exc}: the kustomize renderings are not checked")


@pytest.fixture(scope="session")
def base() -> list[Obj]:
    """`kubectl kustomize k8s/`: what `kubectl apply -k k8s/` creates."""
    return _render_or_skip(K8S)


@pytest.fixture(scope="session")
def sia_example() -> list[Obj]:
    """`kubectl kustomize k8s/patch/`: the agent patch on the example application."""
    return _render_or_skip(K8S_PATCH)
