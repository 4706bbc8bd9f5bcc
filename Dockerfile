# syntax=docker/dockerfile:1
# The keypulse image: one virtualenv, every subcommand (`docker run IMAGE api|ws|pipeline|...`).
# No Java: Kafka runs from its own image (docker-compose.yml). docs/deploy.md describes the
# stack; the build was not run where this file was written (no Docker daemon there).
#
# The base is pinned by tag and by digest (the multi-architecture index of that tag). The
# digest was read from public Dockerfiles, not checked against the registry from here: should
# the pull refuse it, pass the tag alone with --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# -- builder: the virtualenv ---------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/keypulse
WORKDIR /src

# The runtime dependencies first, pinned by constraints.txt: this layer is rebuilt only when
# pyproject.toml or constraints.txt change, not for every change of the code.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && /opt/keypulse/bin/pip install -c constraints.txt -r requirements.txt

COPY README.md ./
COPY core ./core
COPY schemas ./schemas
COPY pipeline ./pipeline
COPY api ./api
COPY ws_bridge ./ws_bridge
COPY infra ./infra
COPY keypulse ./keypulse
RUN /opt/keypulse/bin/pip install -c constraints.txt . \
 && /opt/keypulse/bin/keypulse --version

# -- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/keypulse/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    KEYPULSE_DATA_DIR=/var/lib/keypulse \
    KEYPULSE_HOST=0.0.0.0 \
    KEYPULSE_PORT=8000

RUN groupadd --system --gid 10001 keypulse \
 && useradd --system --uid 10001 --gid keypulse --home-dir /var/lib/keypulse \
      --no-create-home --shell /usr/sbin/nologin keypulse \
 && mkdir -p /var/lib/keypulse \
 && chown keypulse:keypulse /var/lib/keypulse

COPY --from=builder /opt/keypulse /opt/keypulse

# A named volume mounted here starts with this owner (the pipeline's recovery store).
WORKDIR /var/lib/keypulse
USER 10001:10001

# 8000: `keypulse api` / `keypulse ws` (KEYPULSE_PORT); 9400: `keypulse pipeline`'s
# /healthz (KEYPULSE_PIPELINE_HTTP_PORT + process id); 2101: the pipeline cluster's own port.
EXPOSE 8000 9400 2101

# Liveness on KEYPULSE_PORT; the compose file points the pipeline's at its own port. A 503
# (urllib raises on it) or no answer within 4 s fails the check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KEYPULSE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["keypulse"]
CMD ["--help"]
