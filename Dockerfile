# Control-plane image: the same image runs `deputies up` (Simple mode), `deputies web` (daphne) and
# `deputies worker` (qcluster).
#
#   docker build -t deputies:latest .                     on the public python base (needs a registry)
#   scripts/build-image.sh                                no registry: on a locally imported Debian base
#   docker build --build-arg BASE=deputies/base:trixie .  the same by hand (base: scripts/base-image.sh)
#
# Layers go from least to most often changed, so a rebuild after a code change reuses the system
# packages and the Python dependencies and only copies the code (seconds).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# A venv at /opt/venv on every base: Debian's own python3 is "externally managed" (PEP 668), and
# the same path on both bases keeps the rest of the file, and the compose files, identical.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEPUTIES_DATA_DIR=/data \
    DEPUTIES_SERVE_STATIC=true

# System packages, only those the base lacks (deputies/base:trixie has them all: no apt, no network).
RUN set -eu; \
    missing=""; \
    command -v git >/dev/null || missing="$missing git"; \
    command -v bwrap >/dev/null || missing="$missing bubblewrap"; \
    [ -s /etc/ssl/certs/ca-certificates.crt ] || missing="$missing ca-certificates"; \
    if [ -n "$missing" ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    useradd --create-home --uid 10001 deputies; \
    mkdir -p /data; \
    chown deputies /data; \
    python3 -m venv /opt/venv

WORKDIR /app

# Dependencies from pyproject.toml alone (plus the build backend, so the code layer below builds
# without network): this layer changes only when pyproject.toml does.
COPY pyproject.toml ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print(*d['build-system']['requires'], 'wheel', *d['project']['dependencies'], sep=chr(10))" >/tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code. Editable, so it stays at /app: settings find templates/ and static/ next to the packages.
COPY README.md manage.py ./
COPY deputies ./deputies
COPY sessions ./sessions
COPY sandboxes ./sandboxes
COPY integrations ./integrations
COPY templates ./templates
COPY static ./static
# Bytecode now, as pip did for the dependencies: each of the processes would otherwise compile it at
# start-up (PYTHONDONTWRITEBYTECODE keeps them from saving it, and /app is not theirs to write).
RUN pip install --no-deps --no-build-isolation --editable . \
    && python -m compileall -q deputies sessions sandboxes integrations \
    && deputies --help >/dev/null

# Lets scripts/build-image.sh prune this image's own superseded builds and nothing else.
LABEL org.deputies.image=control-plane
USER deputies
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
# `deputies worker` for a worker, `deputies up` for Simple mode (docker-compose.yml).
CMD ["deputies", "web", "--host", "0.0.0.0", "--port", "8000"]
