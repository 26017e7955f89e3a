# The MLflow tracking server of the compose stack: SQLite runs database in /mlflow/db, artifacts
# in /mlflow/artifacts, both served over HTTP (clients need no shared filesystem). Two workers:
# enough for one trainer and a browser, and the server is healthy in half the time of four.
#   docker build -f docker/mlflow.Dockerfile -t tinytale-mlflow .
# BASE_IMAGE and WHEELHOUSE mean what they mean in docker/Dockerfile.
# Hosts other than localhost must be listed in MLFLOW_SERVER_ALLOWED_HOSTS (compose.yaml adds
# the service name), or MLflow answers 403 to protect against DNS rebinding.

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
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_SERVER_ALLOWED_HOSTS=localhost:*,127.0.0.1:*
USER mlflow
WORKDIR /mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--backend-store-uri", "sqlite:////mlflow/db/mlflow.db", \
     "--artifacts-destination", "/mlflow/artifacts", "--serve-artifacts", \
     "--host", "0.0.0.0", "--port", "5000", "--workers", "2"]
