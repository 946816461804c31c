# syntax=docker/dockerfile:1
#
# agentd container image.
#
#   docker build -t agentd .
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

ARG PYTHON_VERSION=3.11

# ---- stage 1: build wheels for agentd and all of its dependencies ------------------------------
FROM python:${PYTHON_VERSION}-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# Only what the wheel is built from (README/LICENSE are optional metadata; the globs may match
# nothing). Tests, bench, systemd/ and the rest stay out of the build context via .dockerignore.
COPY pyproject.toml README* LICENSE* ./
COPY agentd ./agentd
RUN pip wheel --wheel-dir /wheels .

# ---- stage 2: runtime ----------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim

# tini as PID 1: PID 1 gets no default signal handlers and must reap orphans (agentapi's and the
# coding agent's grandchildren get re-parented to it in `supervise` mode). Debian's package.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric non-root UID/GID, so Kubernetes' runAsNonRoot can check it and a shared volume
# (e.g. the control-socket directory shared with the agentapi container) can match it.
# /var/lib/agentd: persisted conversation buffer; /run/agentd: control socket (mode 0700 dirs).
RUN groupadd --system --gid 10001 agentd \
 && useradd --system --uid 10001 --gid agentd --home-dir /var/lib/agentd --no-create-home \
      --shell /usr/sbin/nologin agentd \
 && install -d -o agentd -g agentd -m 0700 /var/lib/agentd /run/agentd

# Install the wheels built above and nothing else: --no-index means no registry access in this
# stage. (A plain COPY rather than `RUN --mount=from=build`, so kaniko/envbuilder and other
# non-BuildKit builders work too; the wheels, a few MB, stay in that one layer.)
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links=/tmp/wheels --root-user-action=ignore \
      --disable-pip-version-check agentd \
 && rm -rf /tmp/wheels \
 && agentd --help >/dev/null

# AGENTD_STATE_DIR: systemd's $STATE_DIRECTORY doesn't exist here. Mount a volume on it
# (`-v agentd-state:/var/lib/agentd`, or an emptyDir in Kubernetes) to keep the buffer across
# container restarts; without one it still works, in the container's writable layer.
# AGENTD_SOCKET: the control socket (under systemd it is $RUNTIME_DIRECTORY/agentd.sock);
# `agentd status` and `agentd snapshot` find the daemon through the same variable. In Kubernetes,
# share /run/agentd (an emptyDir) with the agentapi container so its preStop hook can use it.
# AGENTD_SHUTDOWN_TIMEOUT=8: below docker stop's default 10 s.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AGENTD_STATE_DIR=/var/lib/agentd \
    AGENTD_SOCKET=/run/agentd/agentd.sock \
    AGENTD_SHUTDOWN_TIMEOUT=8 \
    AGENTD_LOG_FORMAT=json

USER 10001:10001
WORKDIR /var/lib/agentd

# Healthy = a daemon answers on the control socket (`agentd status` exits 0; 3 when none).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
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
