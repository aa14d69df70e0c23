# syntax=docker/dockerfile:1
# fraudstream: one image for the scorer, the dataflows, the producer and the one-shot jobs.
#   docker build -t fraudstream:0.1.0 .
#   docker run --rm -p 127.0.0.1:8000:8000 fraudstream:0.1.0            # python -m serving
#     (the scorer listens on 0.0.0.0 inside the container, SERVING_HOST below, so -p reaches it)
#   docker run --rm fraudstream:0.1.0 python -m streaming.features       # any other entry point
# Configuration comes from the environment at run time (see docker-compose.yml); the image holds
# no secrets and no data.

# An exact patch release.  Pinning it by digest too (python:3.11.13-slim-bookworm@sha256:...)
# and updating it: docs/operations.md, "Container images".
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- builder: a virtualenv with the pinned dependencies and the project -----------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when the pins change, not on every
# source edit.  Every wheel the pins resolve to is a manylinux wheel, so no compiler is needed.
COPY pyproject.toml constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
 && pip install -c constraints.txt -r requirements.txt

COPY README.md ./
COPY feature_repo ./feature_repo
COPY scoring ./scoring
COPY serving ./serving
COPY streaming ./streaming
COPY training ./training
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt .

# --- mlflow: MLflow's tracking server and UI over the model registry (compose `mlflow`) -------
# The server's MLflow is the client's (mlflow-skinny in constraints.txt): both migrate and read
# the same database schema.  psycopg: the driver of MODEL_REGISTRY_URL (postgresql+psycopg://).
FROM ${PYTHON_IMAGE} AS mlflow
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1 \
    MLFLOW_DISABLE_TELEMETRY=true HOME=/home/mlflow
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "mlflow==3.18.0" "psycopg[binary]==3.3.9" \
 && groupadd --system --gid 10001 mlflow \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/mlflow --create-home \
        --shell /usr/sbin/nologin mlflow
WORKDIR /home/mlflow
USER 10001:10001
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]

# --- runtime: the virtualenv, the feature repo for the `feast` CLI, a non-root user ----------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FEAST_USAGE=False \
    MLFLOW_DISABLE_TELEMETRY=true \
    HOME=/home/fraud \
    SERVING_HOST=0.0.0.0 \
    FRAUD_DATA_DIR=/var/lib/fraudstream/data \
    SERVING_MODEL_DIR=/var/lib/fraudstream/models \
    TRAINING_MODEL_DIR=/var/lib/fraudstream/models \
    STREAMING_RECOVERY_DIR=/var/lib/fraudstream/recovery

# Fixed UID/GID so volume ownership is predictable across hosts.  The state directories exist in
# the image, owned by that user, so a fresh named volume mounted on them inherits the ownership.
RUN groupadd --system --gid 10001 fraud \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/fraud --create-home \
        --shell /usr/sbin/nologin fraud \
 && mkdir -p /var/lib/fraudstream/data /var/lib/fraudstream/models /var/lib/fraudstream/recovery \
 && chown -R 10001:10001 /var/lib/fraudstream

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# `feast -c feature_repo ...` needs the repository as a directory; owned by root, read-only to
# the service user.
COPY feature_repo ./feature_repo

USER 10001:10001
EXPOSE 8000
# The slim image has no curl; the interpreter does the probe.  urlopen raises on non-2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)"]
CMD ["python", "-m", "serving"]
