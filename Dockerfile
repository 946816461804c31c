# agentd container image.
#
#   docker build -t agentd .
#
# Build arguments (all optional; `make deploy-test` builds with all three):
#   BASE_IMAGE           a Debian-based image with python3 (>= 3.11) and its venv module; both
#                        stages use it (default python:3.11-slim)
#   PIP_INDEX_URL        package index for the build stage (default: pip's, i.e. PyPI)
#   PIP_EXTRA_INDEX_URL  one more index, or several separated by spaces
#   EXTRA_CA             PEM text of extra CA certificates the build stage trusts (a TLS-inspecting
#                        proxy, a private index): --build-arg EXTRA_CA="$(cat corp-ca.pem)"
# Only the build stage sees the last three: the final image has neither the index URLs (which
# may carry credentials) nor the CA, and `docker history` of the final image does not show them.
# No `# syntax=` line: the builder's own Dockerfile frontend is used, so an offline or
# air-gapped BuildKit build does not have to fetch one from Docker Hub.
#
# Sidecar (shares agentapi's network namespace, so http://localhost:3284 is agentapi):
#   docker run -d --name agentd --network container:agentapi --env-file agentd.env \
#     -v agentd-state:/var/lib/agentd agentd
# Entrypoint that supervises agentapi (derive an image that also contains agentapi + the agent):
#   docker run ... --stop-timeout 30 -e AGENTD_SHUTDOWN_TIMEOUT=20 my-agent-image \
#     supervise -- agentapi server -- claude
#
# Clocks: `docker stop` sends STOPSIGNAL, then SIGKILL after 10 s unless --stop-timeout says
# otherwise. The image's AGENTD_SHUTDOWN_TIMEOUT=8 fits inside those 10 s with 2 s to spare;
# raise both together (e.g. --stop-timeout 30 with AGENTD_SHUTDOWN_TIMEOUT=20).

ARG BASE_IMAGE=python:3.11-slim

# ---- stage 1: agentd and its dependencies, installed into a venv under /opt/agentd ----------------
FROM ${BASE_IMAGE} AS build

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG EXTRA_CA

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# The extra CA joins the system bundle (the base image's ca-certificates), and pip is pointed at
# that bundle; without EXTRA_CA, pip keeps its own defaults.
RUN if [ -n "$EXTRA_CA" ]; then \
      printf '%s\n' "$EXTRA_CA" > /usr/local/share/ca-certificates/agentd-build-extra-ca.crt \
      && update-ca-certificates >/dev/null; \
    fi

WORKDIR /src
# Only what the package is built from (README/LICENSE are optional metadata; the globs may match
# nothing). Tests, bench, systemd/ and the rest stay out of the build context via .dockerignore.
COPY pyproject.toml README* LICENSE* ./
COPY agentd ./agentd

# A venv whose interpreter is the base image's python3 (both stages share BASE_IMAGE, so the path
# it links to exists in the final stage too). pip compiles the .pyc files here: the final image
# runs read-only as uid 10001 with PYTHONDONTWRITEBYTECODE=1, and starts faster with them.
# pip and setuptools leave the venv afterwards: nothing at run time installs anything.
RUN [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    if [ -n "$EXTRA_CA" ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    set -e; \
    python3 -m venv /opt/agentd; \
    /opt/agentd/bin/python -m pip install .; \
    /opt/agentd/bin/python -m pip uninstall --yes pip setuptools >/dev/null; \
    /opt/agentd/bin/agentd --help >/dev/null

# ---- stage 2: runtime ----------------------------------------------------------------------
FROM ${BASE_IMAGE}

# tini as PID 1: PID 1 gets no default signal handlers and must reap orphans (agentapi's and the
# coding agent's grandchildren get re-parented to it in `supervise` mode). Debian's package.
# `apt-get clean` too: a base image without Docker's apt settings (a debootstrap one) would keep
# apt's package caches (/var/cache/apt/*.bin, ~80 MB) in this layer.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric non-root UID/GID, so Kubernetes' runAsNonRoot can check it and a shared volume
# (e.g. the control-socket directory shared with the agentapi container) can match it.
# /var/lib/agentd: persisted conversation buffer; /run/agentd: control socket (mode 0700 dirs).
RUN groupadd --system --gid 10001 agentd \
 && useradd --system --uid 10001 --gid agentd --home-dir /var/lib/agentd --no-create-home \
      --shell /usr/sbin/nologin agentd \
 && install -d -o agentd -g agentd -m 0700 /var/lib/agentd /run/agentd

# The installed venv and nothing else: one layer, no wheels, no pip, no registry access in this
# stage. (A plain COPY --from, so kaniko/envbuilder and other non-BuildKit builders work too.)
COPY --from=build /opt/agentd /opt/agentd

# AGENTD_STATE_DIR: systemd's $STATE_DIRECTORY doesn't exist here. Mount a volume on it
# (`-v agentd-state:/var/lib/agentd`, or an emptyDir in Kubernetes) to keep the buffer across
# container restarts; without one it still works, in the container's writable layer.
# AGENTD_SOCKET: the control socket (under systemd it is $RUNTIME_DIRECTORY/agentd.sock);
# `agentd status` and `agentd snapshot` find the daemon through the same variable. In Kubernetes,
# share /run/agentd (an emptyDir) with the agentapi container so its preStop hook can use it.
# AGENTD_SHUTDOWN_TIMEOUT=8: below docker stop's default 10 s.
ENV PATH=/opt/agentd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AGENTD_STATE_DIR=/var/lib/agentd \
    AGENTD_SOCKET=/run/agentd/agentd.sock \
    AGENTD_SHUTDOWN_TIMEOUT=8 \
    AGENTD_LOG_FORMAT=json

USER 10001:10001
WORKDIR /var/lib/agentd

# Healthy = a daemon answers on the control socket (`agentd status` exits 0; 3 when none).
# `agentd status` is a Python start-up plus one request: up to 4 s was measured on a busy 2-core
# machine (`make deploy-test` prints it), so the timeout is 15 s. Docker runs the first check one
# interval after the start.
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
    CMD ["agentd", "status"]

# agentd starts the final snapshot on SIGTERM (docker stop, Kubernetes).
STOPSIGNAL SIGTERM

# tini without -g: tini forwards SIGTERM to agentd alone, not to the whole process group. In
# `supervise` mode agentd must receive the signal first, upload the snapshot while agentapi is
# still alive, and only then stop agentapi itself; with -g, agentapi (and the coding agent) would
# get SIGTERM at the same moment and could be gone before the snapshot is taken. tini still reaps
# every orphan, and `docker run --init` is unnecessary.
ENTRYPOINT ["/usr/bin/tini", "--", "agentd"]
CMD ["run"]
