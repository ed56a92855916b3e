# zerodown edge proxy image: `zerodown proxy` as a non-root user, installed from the hash-locked
# requirements (runtime only: no benchmarks, no test tools).
#
#   docker build -t zerodown .                   from this repository, with a package index
#   docker build --build-arg INSTALL_FROM=wheelhouse -t zerodown .
#                                                from an unpacked `make bundle` directory (it holds
#                                                this file): its wheelhouse, no index
# BASE_IMAGE: a registry inside the fab may serve the base image under another name; its Python
# must be the bundle's (3.11 for a cp311 bundle).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG INSTALL_FROM=index
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . .
# index: locked build tools, zerodown's wheel from the source, the locked runtime wheels.
# wheelhouse: the bundle's own install.sh (no index, every hash checked).
# Both leave /opt/zerodown/bin/zerodown.
RUN set -eu; \
    case "$INSTALL_FROM" in \
      index) \
        [ -f pyproject.toml ] || { echo "no zerodown source here; in a bundle use INSTALL_FROM=wheelhouse" >&2; exit 2; }; \
        pip install --require-hashes -r requirements-build.lock; \
        pip wheel --no-deps --no-build-isolation -w /tmp/wheel .; \
        python -m venv /opt/zerodown/lib/zerodown; \
        /opt/zerodown/lib/zerodown/bin/pip install --require-hashes -r requirements.lock; \
        /opt/zerodown/lib/zerodown/bin/pip install --no-deps /tmp/wheel/zerodown-*.whl; \
        mkdir -p /opt/zerodown/bin; \
        ln -s ../lib/zerodown/bin/zerodown /opt/zerodown/bin/zerodown ;; \
      wheelhouse) \
        [ -f install.sh ] || { echo "no install.sh here: INSTALL_FROM=wheelhouse builds in an unpacked bundle" >&2; exit 2; }; \
        sh install.sh --prefix /opt/zerodown ;; \
      *) echo "INSTALL_FROM must be index or wheelhouse, not '$INSTALL_FROM'" >&2; exit 2 ;; \
    esac; \
    /opt/zerodown/bin/zerodown --version

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/zerodown/bin:$PATH
RUN groupadd --system --gid 10001 zerodown \
    && useradd --system --uid 10001 --gid 10001 --home-dir /srv/zerodown --create-home zerodown
COPY --from=build /opt/zerodown /opt/zerodown
WORKDIR /srv/zerodown
# Numeric, so an orchestrator can tell it is not root without reading /etc/passwd.
USER 10001:10001
# 8080 HTTP, 5000 HSMS. 8081 is the admin API (/health, /v1/status, /metrics, /v1/reload); the
# proxy binds it to 127.0.0.1 unless the config says otherwise, so publishing it needs
# `[proxy] admin_listen = "0.0.0.0:8081"` (and an admin token) in /etc/zerodown/proxy.toml.
EXPOSE 8080 5000 8081
# Asks the admin API from inside the container, at the address the same config names (so keep
# the two --config paths equal if you change CMD). Exit 0 only once routing is applied.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["zerodown", "healthcheck", "--config", "/etc/zerodown/proxy.toml", "--timeout", "3"]
ENTRYPOINT ["zerodown", "proxy"]
CMD ["--config", "/etc/zerodown/proxy.toml"]
