# opencti-sync: follows an OpenCTI live stream into an archive (local volume or S3) and/or a
# second platform. Build: docker build -t opencti-sync . ; see docs/docker-compose.example.yml.
# tests/test_packaging.py runs this file's install commands and entrypoint in a fresh venv and
# checks the hadolint-style rules below, since no container engine runs on development machines.
FROM python:3.12-slim-bookworm

# The image's configuration defaults go in OPENCTI_SYNC_DEFAULTS, a layer BELOW a mounted
# config.yml (--config); plain ENV lines would override the operator's config file. Environment
# variables given to the container (-e) still win over both.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OPENCTI_SYNC_DEFAULTS="ARCHIVE_URI=/var/lib/opencti-sync/archive OPENCTI_SYNC_WORK_DIR=/var/lib/opencti-sync/work CONNECTOR_LOG_FORMAT=json METRICS_ENABLED=true METRICS_PORT=9095"

# A fixed numeric id, so volume permissions can be prepared on the host or by an init container.
RUN groupadd --system --gid 10001 opencti-sync \
    && useradd --system --uid 10001 --gid opencti-sync --no-create-home \
        --home-dir /var/lib/opencti-sync --shell /usr/sbin/nologin opencti-sync \
    && mkdir -p /var/lib/opencti-sync \
    && chown opencti-sync:opencti-sync /var/lib/opencti-sync

WORKDIR /opt/opencti-sync

# Dependencies first, pinned by the lock file: this layer survives code changes.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock

COPY pyproject.toml README.md ./
COPY connector ./connector
RUN pip install --no-cache-dir --no-deps . \
    && pip check

COPY entrypoint.sh /entrypoint.sh
RUN chmod 0755 /entrypoint.sh

USER opencti-sync
WORKDIR /var/lib/opencti-sync
VOLUME ["/var/lib/opencti-sync"]
EXPOSE 9095

# Liveness from the metrics endpoint (cheap, read-only). 'opencti-sync check' would open a
# stream and write a probe object to the archive every interval; 'status' lists every manifest.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["/entrypoint.sh", "healthcheck"]

ENTRYPOINT ["/entrypoint.sh"]
CMD ["run"]
