# The qcsight scoring container: SageMaker Batch Transform and real-time endpoints.
# Build context: the repository root (CDK stages only packaging.SCORING_CONTEXT).
# SageMaker starts it as `docker run IMAGE serve`; `serve` on PATH execs `qcsight batch serve`, which
# listens on $SAGEMAKER_BIND_TO_PORT (8080) and loads the model SageMaker unpacks into /opt/ml/model.
FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY edge_agent/qcsight_core edge_agent/qcsight_core
COPY batch/qcsight_batch batch/qcsight_batch
# qcsight_batch reads S3 through the shared AWS helpers (S3 URIs, ClientError messages).
COPY infra/qcsight_aws infra/qcsight_aws
# A regular (not editable) install: the packages land in site-packages and /build can go.
# DL3013: the versions are the ranges pyproject.toml declares for the project (it has no lock file);
# pinning them a second time here would let the image and `pip install qcsight` drift apart.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[batch]' \
    && rm -rf /build \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin qcsight
COPY --chmod=0755 infra/docker/serve /usr/local/bin/serve

WORKDIR /opt/ml
USER 10001
EXPOSE 8080
# No ENTRYPOINT: SageMaker passes `serve` as the command, and `docker run IMAGE` alone serves too.
CMD ["serve"]
