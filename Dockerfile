# identityd container image (`identityd` is the entrypoint: `serve`, `sia`, ...).
#
#   docker build -t identityd:0.1.0 .
#
# Stage 1 builds identityd's wheel and installs it with its runtime
# dependencies (binary wheels only: nothing is compiled) into a virtualenv
# without pip. Stage 2 is the same slim base plus that virtualenv and the
# default policies: no compiler, no pip, no build backend, a numeric non-root
# user. No HEALTHCHECK: Kubernetes probes /healthz and /readyz (k8s/).

FROM python:3.11.17-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY identityd/ identityd/

# Runtime dependencies only (no [test] extra). --only-binary keeps a missing
# wheel from turning into a compile step; identityd itself is pure Python.
RUN python -m pip wheel --wheel-dir /wheels --only-binary=:all: . \
 && python -m venv --without-pip /opt/identityd \
 && python -m pip --python /opt/identityd/bin/python install \
        --no-index --find-links /wheels /wheels/identityd-*.whl \
 && /opt/identityd/bin/identityd --version

FROM python:3.11.17-slim-bookworm

# The base image's installers and build backend are not needed to run.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
 && groupadd --system --gid 10001 identityd \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin identityd

COPY --from=builder /opt/identityd /opt/identityd
# The default policies; `identityd serve` reads ./policies by default.
COPY policies/ /usr/share/identityd/policies/

ENV PATH=/opt/identityd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /usr/share/identityd
USER 10001:10001
EXPOSE 8443 9090
ENTRYPOINT ["identityd"]
CMD ["--help"]
