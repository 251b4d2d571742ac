# The qcsight review web app (qcsight_review), run by ECS Fargate behind the ALB.
# Build context: the repository root (CDK stages only packaging.REVIEW_CONTEXT).
# The ALB authenticates every request with Cognito (OIDC) and forwards the signed identity headers;
# the app verifies them (trusted-header auth) and serves on port 8000.
FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY edge_agent/qcsight_core edge_agent/qcsight_core
COPY infra/qcsight_cloud infra/qcsight_cloud
COPY infra/qcsight_review infra/qcsight_review
# A regular (not editable) install: the packages land in site-packages and /build can go.
# DL3013: the versions are the ranges pyproject.toml declares for the project (it has no lock file);
# pinning them a second time here would let the image and `pip install qcsight` drift apart.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[review]' \
    && rm -rf /build \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin qcsight

WORKDIR /srv
USER 10001
EXPOSE 8000
CMD ["qcsight", "review", "serve", "--host", "0.0.0.0", "--port", "8000"]
