# The MLflow tracking server of the compose stack: runs database in PostgreSQL (compose.yaml; SQLite
# in /mlflow/db without it), artifacts in /mlflow/artifacts served over HTTP (clients need no
# shared filesystem). Two workers by default (compose: TINYTALE_MLFLOW_WORKERS); see the README's
# load table for what more buy.
#   docker build -f docker/mlflow.Dockerfile -t tinytale-mlflow .
# BASE_IMAGE and WHEELHOUSE mean what they mean in docker/Dockerfile.
#
# The ENTRYPOINT is docker/mlflow-server.sh, which builds the `mlflow server` command from the
# environment (see its header): the Host header check is always on with an explicit list
# (MLFLOW_SERVER_ALLOWED_HOSTS; compose.yaml adds the service name), and TINYTALE_MLFLOW_AUTH=1
# turns on MLflow's basic-auth app with the admin password from TINYTALE_MLFLOW_ADMIN_PASSWORD or
# a secret file. Nothing secret is in the image: the auth configuration is written at start.
# The server runs as the unprivileged user `mlflow` (uid 10001).

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG WHEELHOUSE=""
ENV WHEELHOUSE=${WHEELHOUSE}
RUN python3 -m venv /opt/venv
COPY docker/wheels/ /wheels/
COPY docker/pip.sh docker/requirements-mlflow.txt /build/
RUN /build/pip.sh install -r /build/requirements-mlflow.txt && /opt/venv/bin/pip check

FROM ${BASE_IMAGE}
RUN useradd --create-home --uid 10001 --user-group mlflow \
    && mkdir -p /mlflow/db /mlflow/artifacts && chown -R mlflow:mlflow /mlflow
COPY --from=build /opt/venv /opt/venv
COPY docker/mlflow-server.sh /usr/local/bin/tinytale-mlflow-server
# Next to the entrypoint, which runs it for TINYTALE_MLFLOW_MIGRATE_FROM.
COPY docker/mlflow-migrate.py /usr/local/bin/mlflow-migrate.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_SERVER_ALLOWED_HOSTS=localhost:*,127.0.0.1:* \
    TINYTALE_MLFLOW_HOME=/mlflow \
    TINYTALE_MLFLOW_HOST=0.0.0.0 \
    TINYTALE_MLFLOW_PORT=5000 \
    TINYTALE_MLFLOW_WORKERS=2
USER mlflow
WORKDIR /mlflow
EXPOSE 5000
# Configured by environment only: the script refuses arguments.
ENTRYPOINT ["/bin/bash", "/usr/local/bin/tinytale-mlflow-server"]
CMD []
