#!/usr/bin/env bash
# Deployment checks for CI (issue 6): provide kubectl, render both
# kustomizations, then run tests/deploy with kubectl required, so nothing in it
# skips: schemas (kubernetes-validate, offline), RBAC, security contexts, the
# policy ConfigMap against policies/, the agent patch, the Dockerfile (hadolint)
# and the configuration reference against the CLI.
#
#   scripts/ci-deploy-checks.sh            # from .ci/run, before ./run test
#
# kubectl: $KUBECTL, else the one on PATH, else Debian's kubernetes-client
# (kubectl 1.20, whose kustomize v2 is the oldest the manifests keep to).
# Python: the .venv that ./run creates ($IDENTITYD_VENV), made here if absent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${IDENTITYD_VENV:-.venv}"

find_kubectl() {
    if [ -n "${KUBECTL:-}" ]; then
        command -v "$KUBECTL"
    else
        command -v kubectl || true
    fi
}

KUBECTL_BIN="$(find_kubectl)"
if [ -z "$KUBECTL_BIN" ]; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "ci-deploy-checks: installing kubectl (Debian kubernetes-client)"
        SUDO=""
        if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            kubernetes-client >/dev/null
        KUBECTL_BIN="$(command -v kubectl)"
    else
        echo "######################################################################" >&2
        echo "ci-deploy-checks: SKIPPED: no kubectl and no apt-get to install it." >&2
        echo "The kustomize renderings are NOT checked on this machine." >&2
        echo "######################################################################" >&2
        exit 0
    fi
fi
export KUBECTL="$KUBECTL_BIN"
"$KUBECTL" version --client 2>/dev/null | head -n 1

for dir in k8s k8s/patch; do
    "$KUBECTL" kustomize "$dir" >/dev/null
    echo "ci-deploy-checks: kubectl kustomize $dir renders"
done

if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"

"$VENV/bin/python" tests/deploy/deploy_support.py --check
IDENTITYD_REQUIRE_KUBECTL=1 exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/deploy
