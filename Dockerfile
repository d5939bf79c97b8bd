# Control-plane image: the same image runs `deputies web` (daphne) and `deputies worker` (qcluster).
# BASE can point at a locally imported Debian/Python image when no registry is reachable.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DEPUTIES_DATA_DIR=/data \
    DEPUTIES_SERVE_STATIC=true

RUN apt-get update \
    && apt-get install -y --no-install-recommends git bubblewrap ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 deputies \
    && mkdir -p /data && chown deputies /data

WORKDIR /app
COPY pyproject.toml README.md manage.py ./
COPY deputies ./deputies
COPY sessions ./sessions
COPY sandboxes ./sandboxes
COPY integrations ./integrations
COPY templates ./templates
COPY static ./static
RUN pip install --no-cache-dir .

USER deputies
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
# Override with `deputies worker` for the worker service.
CMD ["deputies", "web", "--host", "0.0.0.0", "--port", "8000"]
