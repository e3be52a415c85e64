# syntax=docker/dockerfile:1
# The trainguard daemon. The image holds the daemon's own dependencies only (grpcio, protobuf, prometheus-client,
# psutil): torch and the training frameworks are extras for the processes being watched, never for the daemon.
#
#   docker build -t trainguard:0.1.0 .
#   docker run --rm -p 9750:9750 -p 9751:9751 -v trainguard-data:/data trainguard:0.1.0

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY monitor ./monitor
COPY probes ./probes
# Wheels for trainguard and every runtime dependency, so the runtime stage installs offline and exactly these.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The base install, with no extras: a torch that slipped into the dependencies fails the build here.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels trainguard \
    && python -c "import importlib.util as u, sys; sys.exit('torch in the image' if u.find_spec('torch') else 0)" \
    && python -c "import monitor.daemon.app" \
    && mkdir -p /data \
    && chown 65532:65532 /data
# A numeric user, so that Kubernetes' runAsNonRoot can check it without a passwd entry.
USER 65532:65532
WORKDIR /data
VOLUME ["/data"]
EXPOSE 9750 9751
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:9750/healthz', timeout=4)"]
ENTRYPOINT ["trainguard", "serve", "--host", "0.0.0.0", "--db", "/data/trainguard.db"]
